"""Accuracy on realistic simulated brains never seen in training: the issue-12 table.

Brains: MNI152 anatomy with the non-dipolar field terms of real fields (simulation.REALISTIC, anatomical
brains only), by default the ten held-out seeds 31000-31009 (training draws from one stream seeded 0,
validation 10000+, calibration 20000+). Methods with their defaults (Tikhonov and MEDI: automatic lambda)
and with the old fixed lambdas; PDI with the bundled weights and, with --weights, another model. Columns:
NRMSE and its demeaned form (the QSM-CI board's), HFEN, XSIM, 2-sigma coverage, Spearman(sigma, |error|), seconds.
Writes benchmarks/results/realistic_<name>.md (with --vi: PDI, MEDI and PDI-VI, realistic_vi_<name>.md, with each
PDI-VI's time per brain in MEDI runs on the same brain, issue 12's measure).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import mean_rows, write_table  # noqa: E402
from PDIQSMLib import solvers  # noqa: E402
from PDIQSMLib.defaults import PDI_REFLECTIONS  # noqa: E402
from PDIQSMLib.evaluation import compare_methods, format_table  # noqa: E402
from PDIQSMLib.pipeline import Settings  # noqa: E402
from PDIQSMLib.simulation import REALISTIC, make_volume  # noqa: E402

SEEDS = tuple(range(31000, 31010))  # ten brains: three (until session 18) ranked models by noise
COLUMNS = ("rmse", "rmse_demeaned", "hfen", "xsim", "within_2sigma", "spearman_sigma_error", "seconds")


def realistic_config(sharp: bool = False, texture: bool = False):
    """The simulator's realistic settings, anatomical brains only, with one brain's tissue boundaries (``sharp``) or
    the template's, with fine tissue texture (``texture``) or without."""
    return replace(REALISTIC, anatomical_fraction=1.0, sharp_fraction=1.0 if sharp else 0.0,
                   texture_fraction=1.0 if texture else 0.0)


def vi_runs(ablation: bool = True, vi2: bool = True) -> list[tuple[str, Settings]]:
    """PDI-VI with its defaults (tuned at the white noise level, sigma at the cone's), and, with ``ablation``,
    VI1 with the white level for both (the old sigma)."""
    runs = [("pdi-vi1 (default)", Settings(method="pdi-vi1", device="cpu"))]
    if vi2:
        runs.append(("pdi-vi2 (default)", Settings(method="pdi-vi2", device="cpu")))
    if ablation:
        runs.append(("pdi-vi1, --noise-level white (sigma too)", Settings(method="pdi-vi1", device="cpu", noise_level="white")))
    return runs


def runs(weights: list[str], reflections: list[int]) -> list[tuple[str, Settings]]:
    out = [("tkd", Settings(method="tkd")),
           (f"tikhonov lambda {solvers.TIKHONOV_LAMBDA:g} (old default)", Settings(method="tikhonov", lam=solvers.TIKHONOV_LAMBDA)),
           ("tikhonov auto (default)", Settings(method="tikhonov")),
           (f"medi lambda {solvers.MEDI_LAMBDA:g} (old default)", Settings(method="medi", lam=solvers.MEDI_LAMBDA)),
           ("medi auto (default)", Settings(method="medi"))]
    for w in weights:
        for n in reflections:
            label = f"pdi {Path(w).stem if w else 'bundled'}" + ("" if n == PDI_REFLECTIONS else f", {n} reflection{'s' * (n > 1)}")
            out.append((label, Settings(method="pdi", weights=w or None, device="cpu", reflections=n)))
    out.append(("medi, edges from pdi's map (--medi-edges pdi)", Settings(method="medi", medi_edges="pdi", device="cpu")))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weights", nargs="*", default=[""], help="PDI weights to score ('' = bundled)")
    parser.add_argument("--reflections", type=int, nargs="*", default=[PDI_REFLECTIONS],
                        help="PDI rows for these reflection counts (inference.REFLECTIONS)")
    parser.add_argument("--name", default="cpu", help="table name suffix")
    parser.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS))
    parser.add_argument("--vi", action="store_true", help="PDI, MEDI and PDI-VI only (up to 3 min a brain and method on "
                        "2 cores), into realistic_vi_<name>.md")
    parser.add_argument("--no-ablation", action="store_true", help="with --vi: the defaults only")
    parser.add_argument("--no-vi2", action="store_true", help="with --vi: PDI and PDI-VI1 only (half the time)")
    parser.add_argument("--sharp", action="store_true", help="the same brains with one brain's tissue boundaries "
                        "instead of the template's averaged ones (anatomy.sharp_tissue); same seeds, same fields' terms")
    parser.add_argument("--texture", action="store_true", help="the same brains with fine tissue texture "
                        "(anatomy.tissue_texture, truth_texture.md); same seeds, same fields' terms")
    args = parser.parse_args()
    config = realistic_config(args.sharp, args.texture)
    per_method: dict[str, list[dict]] = {}
    medi = "medi auto (default)"
    timed: dict[str, list[str]] = {}  # with --vi: each PDI-VI's seconds per brain over MEDI's
    for seed in args.seeds:
        s = make_volume(np.random.default_rng(seed), config)
        if args.vi:
            chosen = [("pdi bundled", Settings(method="pdi", device="cpu")), (medi, Settings(method="medi"))] + \
                vi_runs(not args.no_ablation, not args.no_vi2)
        else:
            chosen = runs(args.weights, args.reflections)
        rows, _ = compare_methods(s.field, s.mask, s.geometry, s.chi, chosen)
        for m, r in rows.items():
            per_method.setdefault(m, []).append(r)
            print(seed, m, {k: round(v, 3) for k, v in r.items() if k in COLUMNS}, flush=True)
            if args.vi and m.startswith("pdi-vi"):
                timed.setdefault(m, []).append(f"{seed} {r['seconds'] / rows[medi]['seconds']:.1f}")
    text = format_table(mean_rows(per_method), COLUMNS)
    if timed:
        text += "\n\nEach PDI-VI's time on a brain in MEDI runs (automatic lambda) on the same brain: " + "; ".join(
            f"{m}: {', '.join(v)}" for m, v in timed.items()) + "."
    write_table(f"realistic_{'vi_' if args.vi else ''}{args.name}", f"Realistic simulated brains (MNI152 anatomy{', sharp tissue boundaries' if args.sharp else ''}"
                f"{', fine tissue texture' if args.texture else ''}, non-dipolar terms), mean of "
                f"{len(args.seeds)} (seeds {', '.join(map(str, args.seeds))})", text)


if __name__ == "__main__":
    main()
