"""Where PDI-VI1's fine-tuned map should be kept: everywhere (the paper's), only where the field disagrees with PDI's
map (``--vi-where discrepant``, ``weighting.discrepant_region``), or gated between the two by PDI's residual over the
field's cone noise level (``--vi-where gated``, PDI-VI1's default; ``weighting.residual_over_cone``), on healthy and
bleeding realistic simulated brains (issue 12).

Per brain: PDI and PDI-VI with every default but ``--vi-where everywhere`` (one fine-tuning), the discrepant map
made from the same two maps as the pipeline makes it (blend * fine-tuned + (1 - blend) * PDI's) and the gated one,
demeaned NRMSE (%), the share of the mask taken (blend > 0.5) and the gate's ratio. ``--weights W`` runs another
model (e.g. one out of its training distribution: the first, procedural-trained model; cache names and the table's
name then carry the weights' stem). Sets: healthy calibration 32000-32005 and bleed calibration
81000-81005 (where the rule's ratio, depth and border were chosen among 2-4, 0-10 mm and 0-10 mm of dilation),
held out: the ten accuracy brains 31000-31009, the bleed brains 80000-80005 (their noise maps, the bleeds' noise 60
times the brain's) and the shared ICH case (seed 0). ``--cache DIR`` keeps each brain's two maps
(``SEED_pdi.npz``, ``SEED_<method>.npz``) and reuses them. Runs of one thread side by side: no timings.

    python benchmarks/vi_where.py [--seeds ...] [--sets ...] [--cache DIR]    -> benchmarks/results/vi_where.md
    python benchmarks/vi_where.py --method pdi-vi2 ...                         -> benchmarks/results/vi_where_vi2.md
    python benchmarks/vi_where.py --weights first.safetensors --sets "healthy, calibration" -> vi_where_first.md

The first model (procedural phantoms only; PDI 91.8 % on the real brain of issue 12):
``git show 17f1e57:Resources/models/pdi-default.safetensors > first.safetensors`` and the same for ``.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import write_table  # noqa: E402
from benchmarks.noisy_regions import case  # noqa: E402
from benchmarks.vi_trace import brain  # noqa: E402
from PDIQSMLib.metrics import nrmse_demeaned  # noqa: E402
from PDIQSMLib.pipeline import Settings, reconstruct  # noqa: E402
from PDIQSMLib.weighting import (GATE_BAND, data_weight, discrepant_region, gated,  # noqa: E402
                                 residual_over_cone, weighted_residual)

SETS = {"healthy, calibration": range(32000, 32006), "bleeds, calibration": range(81000, 81006),
        "healthy, held out": range(31000, 31010), "bleeds, held out": [*range(80000, 80006), 0]}


def load(seed: int):
    """(chi, mask, geometry, field, noise std map or None) of a bleed brain (80000-81999), else ``vi_trace.brain``."""
    if 80000 <= seed < 82000:
        _, chi, mask, g, field, noise, _ = case(seed, 60.0)
        return chi, mask, g, field, noise
    s, noise = brain(seed)
    return s.chi, s.mask, s.geometry, s.field, noise


def maps(seed: int, cache: Path | None, method: str = "pdi-vi1",
         weights: Path | None = None) -> tuple[tuple, dict[str, np.ndarray]]:
    data = load(seed)
    chi, mask, g, field, noise = data
    out = {}
    for name in ("pdi", method):
        path = cache / f"{weights.stem + '_' if weights else ''}{seed}_{name}.npz" if cache else None
        if path and path.exists():
            out[name] = np.load(path)["mean"].astype(np.float64)
            continue
        settings = Settings(method=name, device="cpu", weights=str(weights) if weights else None, vi_where="everywhere")
        out[name] = reconstruct(field, mask, g, settings, noise_std=noise).mean
        if path:
            np.savez(path, mean=out[name].astype(np.float32))
    return data, out


def brain_arguments(description: str, cache: str) -> argparse.ArgumentParser:
    """The arguments this script and ``vi_iterations.py`` share: --seeds, --method, --sets and --cache (``cache``: what
    the folder keeps)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--seeds", type=int, nargs="*", help="these brains only (default: the four sets)")
    ap.add_argument("--method", choices=("pdi-vi1", "pdi-vi2"), default="pdi-vi1")
    ap.add_argument("--sets", nargs="*", choices=list(SETS), help="these sets only (default: all four)")
    ap.add_argument("--cache", type=Path, help=cache)
    return ap


def chosen_sets(args: argparse.Namespace) -> dict:
    """The brains asked for, by set (``--seeds`` as one set 'given'); makes the cache folder."""
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)
    return {"given": args.seeds} if args.seeds else {k: v for k, v in SETS.items() if not args.sets or k in args.sets}


def main() -> None:
    ap = brain_arguments(__doc__.splitlines()[0], "a folder for each brain's PDI and PDI-VI maps, reused when present")
    ap.add_argument("--weights", type=Path, help="another model's weights (default: the bundled model)")
    args = ap.parse_args()
    sets = chosen_sets(args)
    label = args.method.upper()
    lines = [f"| set | brain | PDI | {label} everywhere | {label} discrepant | {label} gated | share taken "
             "| residual / cone |", "|---|---|---|---|---|---|---|---|"]
    means = []
    for name, seeds in sets.items():
        scores = []
        for seed in seeds:
            (chi, mask, g, field, noise), m = maps(seed, args.cache, args.method, args.weights)
            inside, weight = mask > 0, data_weight(mask, noise)
            residual = weighted_residual(field, mask, g, weight, m["pdi"])
            blend = discrepant_region(field, mask, g, weight, m["pdi"], residual=residual)
            kept = blend * m[args.method] + (1 - blend) * m["pdi"]
            ratio = residual_over_cone(field, mask, g, weight, residual)
            chosen = kept if gated(ratio) == "discrepant" else m[args.method]
            row = [nrmse_demeaned(x, chi, inside) for x in (m["pdi"], m[args.method], kept, chosen)]
            scores.append(row)
            lines.append(f"| {name} | {seed or 'ICH'} | " + " | ".join(f"{v:.2f}" for v in row)
                         + f" | {(blend > 0.5).sum() / inside.sum():.4f} | {ratio:.2f} |")
            print(lines[-1], flush=True)
        mean = np.mean(scores, axis=0)
        worse = [sum(r[k] > r[0] + 0.5 for r in scores) for k in (1, 2, 3)]
        means.append(f"| {name} | mean of {len(scores)} | **{mean[0]:.2f}** | **{mean[1]:.2f}** ({worse[0]} worse than "
                     f"PDI by > 0.5) | **{mean[2]:.2f}** ({worse[1]} worse) | **{mean[3]:.2f}** ({worse[2]} worse) "
                     "| | |")
    model = f"the model {args.weights.name}" if args.weights else "bundled model"
    name = "vi_where" + ("" if args.method == "pdi-vi1" else "_vi2") + (f"_{args.weights.stem}" if args.weights else "")
    write_table(name,
                f"{label}'s fine-tuned map everywhere, only where the field disagrees with PDI's, or gated",
                f"Demeaned NRMSE (%), {model}, every default but --vi-where; the discrepant and gated maps blend the "
                f"same fine-tuning; gated: discrepant when PDI's residual / cone lies in {GATE_BAND[0]:g}-"
                f"{GATE_BAND[1]:g}, else everywhere (`benchmarks/vi_where.py`).\n\n"
                + "\n".join(lines[:2] + means + lines[2:]))


if __name__ == "__main__":
    main()
