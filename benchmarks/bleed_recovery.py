"""How much of a bleed each method recovers: the mean susceptibility inside it against the truth's.

On a real hemorrhage patient (issue 12, no reference) the first retrained network's bleed equalled its Tikhonov
input's (0.457 against 0.453 ppm): the network added almost nothing where it mattered. This asks the same on
simulated bleeds, where the truth is known: the realistic brains with an inserted acute bleed of
``simulation.add_bleed`` (seeds ``LESION_SEEDS``, its phase noise, a noise map 20 times the level inside it) and,
with ``--ich``, the shared ICH case (bleed: chi above 1 ppm). Methods with their defaults, the noise map given:
Tikhonov (automatic lambda: PDI's own input channel), MEDI (automatic lambda), PDI, MEDI with PDI's edges
(``--medi-edges pdi``) and, unless ``--no-vi``, PDI-VI1; ``--weights`` adds PDI with other weights (a candidate
model), ``--only-pdi`` keeps the PDI rows alone. Per brain and method: the bleed's mean chi as a share of
the truth's, and the demeaned NRMSE over the brain. Writes benchmarks/results/<name>.md (``--name``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_realistic import realistic_config  # noqa: E402
from benchmarks.common import ich_bleed, ich_case, write_table  # noqa: E402
from benchmarks.vi_change import LESION_SEEDS, bleed_brain  # noqa: E402
from PDIQSMLib.evaluation import compare_methods  # noqa: E402
from PDIQSMLib.pipeline import Settings  # noqa: E402


def methods(vi: bool, weights: tuple[str, ...] | list[str] = (), only_pdi: bool = False) -> list[tuple[str, Settings]]:
    """The methods scored; ``weights``: PDI with these weights files too; ``only_pdi``: the PDI rows alone."""
    out = [("tikhonov auto (PDI's input)", Settings(method="tikhonov")), ("medi auto", Settings(method="medi")),
           ("pdi", Settings(method="pdi", device="cpu")),
           ("medi, pdi's edges", Settings(method="medi", medi_edges="pdi", device="cpu"))]
    out += [(f"pdi {Path(w).stem}", Settings(method="pdi", weights=w, device="cpu")) for w in weights]
    out += [("pdi-vi1", Settings(method="pdi-vi1", device="cpu"))] if vi else []
    return [(n, s) for n, s in out if s.method == "pdi"] if only_pdi else out


def brain_row(field, mask, geometry, chi, bleed, noise, chosen) -> dict[str, tuple[float, float]]:
    """Per method of ``chosen`` (bleed mean / truth's, demeaned NRMSE %), and the truth's bleed mean under 'truth'."""
    rows, _ = compare_methods(field, mask, geometry, chi, chosen, noise_std=noise, regions={"bleed": bleed})
    truth = float(chi[bleed].mean())
    out = {name: (r["mean_bleed"] / truth, r["rmse_demeaned"]) for name, r in rows.items()}
    out["truth"] = (truth, float(bleed.sum() * np.prod(geometry.voxel_size) / 1000.0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=list(LESION_SEEDS))
    ap.add_argument("--ich", action="store_true", help="the shared ICH case too")
    ap.add_argument("--no-vi", action="store_true", help="leave PDI-VI1 out (minutes a brain)")
    ap.add_argument("--weights", nargs="*", default=[], help="PDI with these weights files too (a candidate model)")
    ap.add_argument("--only-pdi", action="store_true", help="the PDI rows alone (bundled and --weights)")
    ap.add_argument("--name", default="bleed_recovery", help="the table's name under benchmarks/results")
    args = ap.parse_args()
    chosen = methods(not args.no_vi, args.weights, args.only_pdi)
    rows = {}
    for seed in args.seeds:
        s, chi, field, noise, bleed = bleed_brain(seed, realistic_config())  # as vi_change.py --lesions
        rows[str(seed)] = brain_row(field, s.mask, s.geometry, chi, bleed, noise, chosen)
        print(seed, rows[str(seed)], flush=True)
    if args.ich:
        chi, mask, noise, g, field = ich_case()
        rows["ICH case"] = brain_row(field, mask, g, chi, ich_bleed(chi, mask), noise, chosen)
        print("ICH", rows["ICH case"], flush=True)
    names = [n for n, _ in chosen]
    head = "| brain | bleed: truth's mean (ppm), volume (ml) | " + " | ".join(f"{n}: bleed / truth, NRMSE %" for n in names)
    lines = [head + " |", "|---|---|" + "---|" * len(names)]
    for brain, r in rows.items():
        cells = [f"{r['truth'][0]:.2f}, {r['truth'][1]:.1f}"] + [f"{r[n][0]:.2f}, {r[n][1]:.1f}" for n in names]
        lines.append(f"| {brain} | " + " | ".join(cells) + " |")
    seeds = [str(s) for s in args.seeds]
    if seeds:
        mean = [f"{np.mean([rows[b][n][0] for b in seeds]):.2f}, {np.mean([rows[b][n][1] for b in seeds]):.1f}" for n in names]
        lines.append(f"| mean over the {len(seeds)} bleed brains | | " + " | ".join(mean) + " |")
    write_table(args.name, "How much of a bleed each method recovers (mean chi in the bleed / the truth's)",
                "\n".join(lines))


if __name__ == "__main__":
    main()
