"""Justify the regularisation defaults: RMSE of Tikhonov and MEDI over lambda on simulated brains.

Brains are the procedural phantoms (seeds 500..502, never used for training or evaluation), fields
simulated with 2x padding, white noise of 1e-3 and 3e-3 ppm. Writes benchmarks/results/lambda_sweep.md.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from benchmarks.common import write_table  # noqa: E402
from PDIQSMLib import metrics, phantoms, solvers  # noqa: E402
from PDIQSMLib.geometry import Geometry  # noqa: E402
from PDIQSMLib.simulation import add_noise, field_of  # noqa: E402

SEEDS = (500, 501)
NOISE = (1e-3, 3e-3)
TIK = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
MEDI = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # no options; --help says what it does
    vs = (1.0, 1.0, 2.0)
    rows = {("tkd", 0.2, n): [] for n in NOISE}
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        ph = phantoms.brain((112, 128, 64), vs, rng)
        g = Geometry(vs, (0.0, 0.0, 1.0))
        clean = field_of(ph.chi, ph.mask, g, 2.0)
        m = torch.from_numpy(ph.mask.astype(np.float32))
        for noise in NOISE:
            b = torch.from_numpy(add_noise(clean, ph.mask, noise, rng))
            score = lambda x: metrics.nrmse(x.numpy(), ph.chi, ph.mask)  # noqa: E731
            rows[("tkd", 0.2, noise)].append(score(solvers.tkd(b, m, g)))
            for lam in TIK:
                rows.setdefault(("tikhonov", lam, noise), []).append(score(solvers.tikhonov(b, m, g, lam)))
            rows.setdefault(("tikhonov L-curve", 0, noise), []).append(
                score(solvers.tikhonov(b, m, g, solvers.tikhonov_lcurve(b, m, g))))
            for lam in MEDI:
                rows.setdefault(("medi", lam, noise), []).append(score(solvers.medi(b, m, g, lam)))
            print(f"seed {seed} noise {noise} done", flush=True)
    lines = ["| method | lambda | noise (ppm) | RMSE % (mean of 2 brains) |", "|---|---|---|---|"]
    for (method, lam, noise), v in rows.items():
        lines.append(f"| {method} | {lam:g} | {noise:g} | {np.mean(v):.1f} |")
    write_table("lambda_sweep", "Regularisation sweep on simulated brains (112x128x64, 1x1x2 mm)", "\n".join(lines))


if __name__ == "__main__":
    main()
