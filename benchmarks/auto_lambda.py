"""The regularisation weight from the field's own noise level: measure the rule, then check it.

On realistic simulated brains (MNI152 anatomy, non-dipolar field terms; seeds 600.., never used in
training) at three strengths of the non-dipolar part, the best fixed lambda of Tikhonov and MEDI
(demeaned NRMSE, the QSM-CI board's metric) is found on a grid and compared with the automatic one,
``lambda = c * s^2`` with s the cone estimate of the effective noise (fieldstats.cone_noise): the
Bayesian reading of both priors (lambda = noise variance / prior variance). ``--fit`` prints the c
that fits the grid optima (the constants in solvers.py come from it); the table says how far the
automatic choice is from the best fixed one. Writes benchmarks/results/auto_lambda.md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import numpy as np
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from benchmarks.common import write_table  # noqa: E402
from PDIQSMLib import metrics, solvers  # noqa: E402
from PDIQSMLib.fieldstats import cone_noise  # noqa: E402
from PDIQSMLib.simulation import REALISTIC, make_volume  # noqa: E402

SEEDS = (600, 601)
STRENGTHS = (0.5, 1.0, 2.0)  # multiplies every non-dipolar amplitude range
TIK = np.logspace(-3, 0, 13)
MEDI = np.logspace(-4, -1, 7)
MEDI_FIT = np.logspace(-3.5, -1.5, 5)  # --fit for MEDI: a coarser grid (MEDI costs 5-15 s a run)
# --c-grid: c itself on a grid of factors 1.4 (the --fit grid above steps MEDI's lambda by 3.2x, too coarse to place
# c), on the anatomical cases above and on the four sigma-calibration brains (realistic, full size, seeds 20000..)
C_GRID = {"medi": (35.0, 50.0, 70.0, 100.0, 140.0, 200.0, 280.0),
          "tikhonov": (1000.0, 1500.0, 2100.0, 3000.0, 4200.0, 6000.0, 8400.0)}
CALIBRATION_SEEDS = (20000, 20001, 20002, 20003)


KINDS = ("anatomical", "procedural")  # the two brain kinds of the training mix


TEXTURE = 0.0  # --texture: every anatomical brain with fine tissue texture (anatomy.tissue_texture)


def scaled(strength: float, kind: str):
    s = strength
    return replace(REALISTIC, anatomical_fraction=1.0 if kind == "anatomical" else 0.0, brain_fraction=1.0,
                   texture_fraction=TEXTURE,
                   anatomical_max_shape=(112, 128, 80), brain_fov_mm=(112.0, 128.0, 100.0),
                   residue_ppm=tuple(s * v for v in REALISTIC.residue_ppm),
                   correlated_ppm=tuple(s * v for v in REALISTIC.correlated_ppm),
                   noise_ppm=tuple(s * v for v in REALISTIC.noise_ppm),
                   anisotropy_ppm=tuple(s * v for v in REALISTIC.anisotropy_ppm))


def cases():
    for kind in KINDS:
        for strength in STRENGTHS:
            for seed in SEEDS:
                yield f"{kind} x{strength:g}", seed, make_volume(np.random.default_rng(seed), scaled(strength, kind))


def sweep(method: str, sample, grid) -> list[float]:
    b, m = torch.from_numpy(sample.field), torch.from_numpy(sample.mask.astype(np.float32))
    solve = solvers.tikhonov if method == "tikhonov" else solvers.medi
    return [metrics.nrmse_demeaned(solve(b, m, sample.geometry, float(lam)).numpy(), sample.chi, sample.mask)
            for lam in grid]


def c_grid(method: str) -> None:
    """The demeaned NRMSE of ``method`` for each c of C_GRID (lambda = c s^2; MEDI with the pipeline's W and M
    without a magnitude) per brain; the c with the lowest mean and the median of each brain's best c. Writes
    auto_lambda_<method>.md."""
    grid = C_GRID[method]
    brains = [(case, seed, sample) for case, seed, sample in cases() if case.startswith("anatomical")]
    brains += [("calibration (realistic, full size)", seed, make_volume(np.random.default_rng(seed),
                                                                       replace(REALISTIC, anatomical_fraction=1.0,
                                                                               texture_fraction=TEXTURE)))
               for seed in CALIBRATION_SEEDS]
    rows = []
    for case, seed, sample in brains:
        s = cone_noise(sample.field, sample.mask, sample.geometry)
        rows.append((case, seed, s, sweep(method, sample, [c * s**2 for c in grid])))
        print(rows[-1], flush=True)
    table = np.array([r[3] for r in rows])
    best = [grid[int(np.argmin(e))] for e in table]
    head = " | ".join(f"c = {c:g}" for c in grid)
    lines = [f"| brain, non-dipolar strength | seed | cone noise s (ppm) | {head} |",
             "|---|---|---|" + "---|" * len(grid)]
    for (case, seed, s, errors), b in zip(rows, best):
        cells = " | ".join(f"**{e:.1f}**" if c == b else f"{e:.1f}" for c, e in zip(grid, errors))
        lines.append(f"| {case} | {seed} | {s:.5f} | {cells} |")
    for name, part in (("mean, all", table), ("mean, calibration brains", table[-len(CALIBRATION_SEEDS):])):
        lines.append(f"| {name} | | | " + " | ".join(f"{e:.1f}" for e in part.mean(axis=0)) + " |")
    lines += ["", f"Lowest mean over all brains: c = {grid[int(np.argmin(table.mean(axis=0)))]:g}; median of each "
              f"brain's best c: {np.exp(np.median(np.log(best))):.3g}; the pipeline's c: "
              f"{solvers.AUTO_LAMBDA_PER_NOISE2[method]:g}."]
    write_table(f"auto_lambda_{method}{'_texture' if TEXTURE else ''}", f"{method}'s automatic lambda, c s^2: "
                f"demeaned NRMSE % by c, realistic simulated brains{' with fine tissue texture' if TEXTURE else ''}",
                "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", nargs="+", default=["tikhonov", "medi"])
    parser.add_argument("--fit", action="store_true", help="print the fitted constant c per method")
    parser.add_argument("--c-grid", choices=sorted(C_GRID), help="the method's NRMSE over a grid of c "
                        "(auto_lambda_<method>.md)")
    parser.add_argument("--texture", action="store_true", help="--c-grid on the same seeds with fine tissue texture "
                        "(anatomy.tissue_texture; auto_lambda_<method>_texture.md)")
    args = parser.parse_args()
    global TEXTURE
    TEXTURE = 1.0 if args.texture else 0.0
    if args.c_grid:
        return c_grid(args.c_grid)
    grids = {"tikhonov": TIK, "medi": MEDI_FIT if args.fit else MEDI}
    rows, fits = [], {m: [] for m in args.methods}
    for case, seed, sample in cases():
        s = cone_noise(sample.field, sample.mask, sample.geometry)
        for method in args.methods:
            errors = sweep(method, sample, grids[method])
            best = int(np.argmin(errors))
            fits[method].append(np.log(grids[method][best] / s**2))
            auto = solvers.auto_lambda(method, s)
            auto_err = sweep(method, sample, [auto])[0]
            rows.append((method, case, seed, s, grids[method][best], errors[best], auto, auto_err))
            print(rows[-1], flush=True)
    for method, logs in fits.items():
        print(f"{method}: c = {np.exp(np.median(logs)):.4g} (lambda = c s^2; spread of log c {np.std(logs):.2f})")
    if args.fit:
        return
    lines = ["| method | brain, non-dipolar strength | seed | cone noise s (ppm) | best fixed lambda | its NRMSE % | "
             "automatic lambda | its NRMSE % | excess % |", "|---|---|---|---|---|---|---|---|---|"]
    for method, case, seed, s, lam, err, auto, auto_err in rows:
        lines.append(f"| {method} | {case} | {seed} | {s:.4f} | {lam:.3g} | {err:.1f} | {auto:.3g} | "
                     f"{auto_err:.1f} | {100 * (auto_err / err - 1):+.1f} |")
    write_table("auto_lambda", "Automatic lambda from the cone noise vs the best fixed lambda, realistic simulated "
                "brains (demeaned NRMSE)", "\n".join(lines))


if __name__ == "__main__":
    main()
