"""The MAP baselines on the training run's validation brains: the reference lines of the learning curve.

Training validates on held-apart realistic brains (``training.validation_set``: seeds 10000.., the
realistic recipe, brains only; ``pdiqsm train --validation-count 3`` uses the first three). This scores
TKD, Tikhonov and MEDI (automatic lambda, the defaults) and the bundled PDI on the same brains with the
same metrics (whole-mask NRMSE and its demeaned form, mean over the brains), so the curve in
Resources/models/pdi-default-loss.png is read against them. Writes benchmarks/results/validation_references.md.

    python benchmarks/validation_references.py [--count 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import write_table  # noqa: E402
from PDIQSMLib.evaluation import compare_methods  # noqa: E402
from PDIQSMLib.pipeline import Settings  # noqa: E402
from PDIQSMLib.training import validation_set  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=3)
    args = ap.parse_args()
    methods = [("TKD", Settings(method="tkd")), ("Tikhonov, automatic lambda", Settings(method="tikhonov")),
               ("MEDI, automatic lambda", Settings(method="medi")), ("PDI, bundled", Settings(method="pdi", device="cpu"))]
    scores: dict[str, list[tuple[float, float]]] = {}
    for sample in validation_set(count=args.count):
        rows, _ = compare_methods(sample.field, sample.mask, sample.geometry, sample.chi, methods)
        for name, row in rows.items():
            scores.setdefault(name, []).append((row["rmse"], row["rmse_demeaned"]))
    lines = [f"The {args.count} validation brains of `pdiqsm train` (seeds 10000-{10000 + args.count - 1}); mean over them.", "",
             "| method | NRMSE % | demeaned NRMSE % | each brain, demeaned |", "|---|---|---|---|"]
    for name, pairs in scores.items():
        each = ", ".join(f"{d:.1f}" for _, d in pairs)
        lines.append(f"| {name} | {np.mean([p[0] for p in pairs]):.2f} | {np.mean([p[1] for p in pairs]):.2f} | {each} |")
    write_table("validation_references", "MAP baselines on the training validation brains", "\n".join(lines))


if __name__ == "__main__":
    main()
