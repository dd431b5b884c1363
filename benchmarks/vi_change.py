"""When does PDI-VI1 help? Reference-free readings of a fine-tuning run beside its gain over PDI.

For each realistic held-out brain (seeds 31000-31009 by default, as ``bench_realistic.py``; the template's
boundaries, or ``--sharp``) and, with ``--ich``, the shared ICH case (with its noise map): PDI and PDI-VI1 with
their defaults, the demeaned NRMSE of both (the truth is used for these two columns only), and what a user could
read without a truth: how far fine-tuning moved the map in units of PDI's own sigma (RMS of the change over RMS
sigma; share of voxels moved by more than 2 sigma), how much of the field's misfit it removed (RMS of the
demeaned residual b - D chi in the mask, VI over PDI), the field's cone-to-white noise ratio
(``fieldstats``), the iterations run, and how concentrated the movement is: the share of the voxels moved beyond
2 sigma that lie in their largest connected cluster (26-neighbours; a lesion PDI missed should move as one
compact cluster, non-dipolar field fitted into chi as scattered specks). Beside it, an exploration scored with the
truth: PDI's map with fine-tuning's change kept only in that largest cluster (grown by 2 voxels), "VI1 in its
cluster". Then, over the brains, Spearman's correlation of each reading with the
gain (PDI-VI1 minus PDI, positive = fine-tuning made it worse): a reading that ranks the gain could decide
when to fine-tune. ``--lesions``: brains with an inserted bleed instead (``simulation.add_bleed``, seeds ``LESION_SEEDS``),
the pathology PDI-VI is for. Above it, the two methods' mean scores (as ``bench_realistic.py --vi``). Writes
benchmarks/results/vi_change_<name>.md. About 2.5 min a brain on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage, stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_realistic import COLUMNS, SEEDS, realistic_config  # noqa: E402
from benchmarks.common import ich_case, mean_rows, unexplained, write_table  # noqa: E402
from PDIQSMLib.evaluation import compare_methods, format_table  # noqa: E402
from PDIQSMLib.fieldstats import field_stats  # noqa: E402
from PDIQSMLib.metrics import nrmse_demeaned  # noqa: E402
from PDIQSMLib.pipeline import Settings  # noqa: E402
from PDIQSMLib.simulation import BLEED_NOISE_FACTOR, add_bleed, make_volume  # noqa: E402

READINGS = ("moved_rms_sigma", "moved_over_2sigma", "largest_cluster_share", "misfit_ratio", "cone_white_ratio",
            "iterations")


def residual_rms(field, chi, where, geometry) -> float:
    """RMS of the demeaned residual b - D chi over ``where`` (chi's field computed over all of chi)."""
    return float(unexplained(field, chi, where, geometry)[where].std())


def largest_cluster(moved: np.ndarray) -> tuple[np.ndarray, float]:
    """The largest 26-connected cluster of ``moved`` (a boolean volume) and its share of the moved voxels."""
    labels, n = ndimage.label(moved, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return np.zeros_like(moved), 0.0
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes)), float(sizes.max() / sizes.sum())


LESION_SEEDS = tuple(range(80_000, 80_006))  # brains with an inserted bleed, apart from every other seed range


def bleed_brain(seed: int, config, noise_factor: float = BLEED_NOISE_FACTOR):
    """The realistic brain of ``seed`` (``config``) with the bleed of ``simulation.add_bleed`` drawn from seed + 1
    (its noise ``noise_factor`` times the brain's): (sample, chi, field, noise map, bleed)."""
    s = make_volume(np.random.default_rng(seed), config)
    b, bleed = add_bleed(s, np.random.default_rng(seed + 1), noise_factor=noise_factor)
    return s, b.chi, b.field, b.noise_map, bleed


def readings(field, mask, geometry, truth, scores: dict[str, list[dict]], noise_std=None) -> dict[str, float]:
    """The row of one brain; ``scores`` gets each method's full score row appended (for the mean table)."""
    methods = [("pdi", Settings(method="pdi", device="cpu")), ("vi1", Settings(method="pdi-vi1", device="cpu"))]
    rows, res = compare_methods(field, mask, geometry, truth, methods, noise_std=noise_std)
    for method, row in rows.items():
        scores.setdefault(method, []).append(row)
    m = np.asarray(mask) > 0
    pdi, vi = res["pdi"], res["vi1"]
    change = (vi.mean - pdi.mean)[m].astype(np.float64)
    sigma = pdi.std[m].astype(np.float64)
    moved = np.zeros(m.shape, bool)
    moved[m] = np.abs(change) > 2 * sigma
    cluster, share = largest_cluster(moved)
    keep = ndimage.binary_dilation(cluster, np.ones((3, 3, 3), bool), iterations=2) & m
    kept = np.where(keep, vi.mean, pdi.mean)
    fs = field_stats(field, m, geometry)
    # the misfit where the field is data: with a noise map, not where it is over 10 times its median (a bleed)
    fit = m if noise_std is None else m & (noise_std <= 10 * np.median(noise_std[m]))
    return {"pdi": rows["pdi"]["rmse_demeaned"], "vi1": rows["vi1"]["rmse_demeaned"],
            "gain": rows["vi1"]["rmse_demeaned"] - rows["pdi"]["rmse_demeaned"],
            "kept": nrmse_demeaned(kept, truth, m),
            "largest_cluster_share": share,
            "moved_rms_sigma": float(np.sqrt(np.mean(change**2) / np.mean(sigma**2))),
            "moved_over_2sigma": float(moved[m].mean()),
            "misfit_ratio": residual_rms(field, vi.mean, fit, geometry) / residual_rms(field, pdi.mean, fit, geometry),
            "cone_white_ratio": fs.cone_noise_ppm / fs.white_noise_ppm, "iterations": float(vi.info["iterations"]),
            "seconds": rows["vi1"]["seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS))
    ap.add_argument("--sharp", action="store_true", help="one brain's tissue boundaries (as bench_realistic.py)")
    ap.add_argument("--ich", action="store_true", help="the shared ICH case too (not in the correlations)")
    ap.add_argument("--lesions", action="store_true", help="a bleed inserted in each brain (add_bleed, seeded by "
                    "the brain's seed + 1); --seeds default to LESION_SEEDS")
    ap.add_argument("--name", default="heldout10")
    args = ap.parse_args()
    config = realistic_config(args.sharp)
    rows: dict[str, dict[str, float]] = {}
    scores: dict[str, list[dict]] = {}
    seeds = list(LESION_SEEDS) if args.lesions and args.seeds == list(SEEDS) else args.seeds
    for seed in seeds:
        if args.lesions:
            s, chi, field, noise, _ = bleed_brain(seed, config)
            rows[str(seed)] = readings(field, s.mask, s.geometry, chi, scores, noise_std=noise)
        else:
            s = make_volume(np.random.default_rng(seed), config)
            rows[str(seed)] = readings(s.field, s.mask, s.geometry, s.chi, scores)
        print(seed, {k: round(v, 4) for k, v in rows[str(seed)].items()}, flush=True)
    brains = list(rows)
    if args.ich:
        chi, mask, noise, g, field = ich_case()
        rows["ICH case"] = readings(field, mask, g, chi, {}, noise_std=noise)  # its scores stay out of the means
        print("ICH", {k: round(v, 4) for k, v in rows["ICH case"].items()}, flush=True)
    cols = ("pdi", "vi1", "gain", "kept") + READINGS + ("seconds",)
    lines = ["| brain | PDI demeaned NRMSE % | PDI-VI1 % | gain (VI1 - PDI) | VI1 in its cluster % | moved, RMS / RMS "
             "sigma | moved > 2 sigma (share) | largest cluster's share of them | misfit VI1 / PDI | cone / white noise | "
             "iterations | VI1 s |", "|" + "---|" * (len(cols) + 1)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.3g}" for c in cols) + " |")
    gains = [rows[b]["gain"] for b in brains]
    def rank(c):  # Spearman of a reading with the gain; "constant" when it never varied (iterations at the cap)
        values = [rows[b][c] for b in brains]
        if len(brains) < 3:
            return ""
        return "constant" if np.ptp(values) == 0 else f"{stats.spearmanr(values, gains)[0]:.2f}"
    rho = [rank(c) for c in READINGS]
    lines.append("| Spearman with the gain, over the brains | | | | | " + " | ".join(rho) + " | |")
    lines.append("| mean over the brains | " + " | ".join(f"{np.mean([rows[b][c] for b in brains]):.3g}"
                                                      for c in ("pdi", "vi1", "gain", "kept")) + " |" + " |" * 7)
    title = f"PDI-VI1 against PDI, and what could tell them apart ({'sharp boundaries, ' if args.sharp else ''}seeds " \
            f"{', '.join(map(str, seeds))}{', a bleed in each' if args.lesions else ''}{', ICH case' if args.ich else ''})"
    labels = {"pdi": "pdi bundled", "vi1": "pdi-vi1 (default)"}
    means = {labels[m]: row for m, row in mean_rows(scores).items()}
    text = (f"Mean over the {len(brains)} brains (the ICH case apart):\n\n{format_table(means, COLUMNS)}\n\n"
            + "\n".join(lines))
    write_table(f"vi_change_{args.name}", title, text)


if __name__ == "__main__":
    main()
