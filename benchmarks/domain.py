"""PDI outside the grids and B0 tilts it was trained on: realistic simulated brains on fixed grids, beside MAP.

The bundled network was trained on anatomical brains resampled to 0.6-1.2 mm in plane and 1-3 mm slices (and
procedural brains at 1 mm in plane) with B0 tilted up to 20 degrees (``simulation.REALISTIC``). Real data come on
other grids too: 0.5 mm at 7 T, 4-5 mm clinical slices, oblique slabs. Here the same held-out seeds are simulated
on fixed grids inside and outside that range (``simulation.realistic_brain``: MNI152 anatomy with the non-dipolar
terms of real fields, a field of view of at most the training's 144 x 144 x 96 voxels, or the --big-shape for the
finest grids) and reconstructed with each method's defaults (PDI: a volume stored with B0 along another axis is read
relabelled, ``geometry.network_axes``; a grid with an axis finer than the training's, 0.6 mm in plane or 1 mm
slices, takes its coarse band from blocks inside that range, ``scales``). Demeaned NRMSE % (the QSM-CI board's),
mean over the seeds; PDI's 2-sigma coverage beside it; a row's wall time for all methods and seeds. Writes
benchmarks/results/domain.md (--name).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import write_table  # noqa: E402
from PDIQSMLib.evaluation import compare_methods  # noqa: E402
from PDIQSMLib.pipeline import Settings  # noqa: E402
from PDIQSMLib import geometry, pipeline  # noqa: E402
from PDIQSMLib.simulation import realistic_brain  # noqa: E402

relabelled, trained = geometry.network_axes, pipeline.trained_voxels

# (label, voxel size in mm, B0's tilt from the third axis towards the first in degrees, inside the training range);
# rows marked "as stored" run without the network's axis relabelling, "fine run only" without the coarse band from
# blocks (both as PDI was before session 36)
GRIDS = [
    ("1 x 1 x 1 mm, B0 along z", (1.0, 1.0, 1.0), 0.0, True),
    ("1 x 1 x 1 mm, B0 along the first voxel axis (relabelled for the network)", (1.0, 1.0, 1.0), 90.0, True),
    ("1 x 1 x 1 mm, B0 along the first voxel axis, as stored (not relabelled)", (1.0, 1.0, 1.0), 90.0, False),
    ("0.8 x 0.8 x 2 mm, tilt 15", (0.8, 0.8, 2.0), 15.0, True),
    ("1 x 1 x 1 mm, tilt 30", (1.0, 1.0, 1.0), 30.0, False),
    ("1 x 1 x 1 mm, tilt 45", (1.0, 1.0, 1.0), 45.0, False),
    ("0.5 x 0.5 x 0.5 mm (7 T), coarse band from 1 mm blocks", (0.5, 0.5, 0.5), 0.0, False),
    ("0.5 x 0.5 x 0.5 mm (7 T), fine run only", (0.5, 0.5, 0.5), 0.0, False),
    ("0.5 x 0.5 x 1 mm, coarse band from 1 x 1 x 2 mm blocks", (0.5, 0.5, 1.0), 0.0, False),
    ("0.5 x 0.5 x 1 mm, fine run only", (0.5, 0.5, 1.0), 0.0, False),
    ("0.64 x 0.64 x 0.64 mm, coarse band from 0.64 x 0.64 x 1.28 mm blocks", (0.64, 0.64, 0.64), 0.0, False),
    ("0.64 x 0.64 x 0.64 mm, fine run only", (0.64, 0.64, 0.64), 0.0, False),
    ("0.8 x 0.8 x 0.8 mm, coarse band from 0.8 x 0.8 x 1.6 mm blocks", (0.8, 0.8, 0.8), 0.0, False),
    ("0.8 x 0.8 x 0.8 mm, fine run only", (0.8, 0.8, 0.8), 0.0, False),
    ("1 x 1 x 4 mm", (1.0, 1.0, 4.0), 0.0, False),
    ("1.5 x 1.5 x 1.5 mm", (1.5, 1.5, 1.5), 0.0, False),
]
METHODS = [("tkd", Settings(method="tkd")), ("tikhonov", Settings(method="tikhonov")),
           ("medi", Settings(method="medi")), ("pdi", Settings(method="pdi", device="cpu"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", type=int, nargs="*", help="rows of GRIDS to run (default: all)")
    parser.add_argument("--name", default="domain", help="the table's name: benchmarks/results/NAME.md")
    parser.add_argument("--seeds", type=int, nargs="*", default=[31000, 31001, 31002, 31003, 31004])
    parser.add_argument("--big-shape", type=int, nargs=3, default=(192, 192, 144),
                        help="field of view (voxels) for grids finer than 0.8 mm: a comparable piece of brain")
    args = parser.parse_args()
    rows = ["| grid | in training range | TKD | Tikhonov auto | MEDI auto | PDI | PDI - best MAP | PDI 2-sigma coverage "
            "| voxels in mask | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, vs, tilt, inside in [GRIDS[i] for i in args.grids] if args.grids else GRIDS:
        t0 = time.perf_counter()
        b0 = (math.sin(math.radians(tilt)), 0.0, math.cos(math.radians(tilt)))
        geometry.network_axes = (lambda g: (0, 1, 2)) if "as stored" in label else relabelled
        pipeline.trained_voxels = (lambda manifest: None) if "fine run only" in label else trained
        shape = tuple(args.big_shape) if min(vs) < 0.8 else (144, 144, 96)
        scores: dict[str, list[float]] = {}
        voxels = []
        for seed in args.seeds:
            sample, _ = realistic_brain(seed, vs, b0, shape)
            got, _ = compare_methods(sample.field, sample.mask, sample.geometry, sample.chi, METHODS)
            for name, row in got.items():
                scores.setdefault(name, []).append(row["rmse_demeaned"])
                if name == "pdi":
                    scores.setdefault("coverage", []).append(row["within_2sigma"])
            voxels.append(int(sample.mask.sum()))
            print(label, seed, {k: round(v[-1], 3) for k, v in scores.items()}, flush=True)
        mean = {k: float(np.mean(v)) for k, v in scores.items()}
        best_map = min(mean["tkd"], mean["tikhonov"], mean["medi"])
        rows.append(f"| {label} | {'yes' if inside else 'no'} | {mean['tkd']:.2f} | {mean['tikhonov']:.2f} | "
                    f"{mean['medi']:.2f} | **{mean['pdi']:.2f}** | {mean['pdi'] - best_map:+.2f} | "
                    f"{mean['coverage']:.3f} | {int(np.mean(voxels))} | {time.perf_counter() - t0:.0f} |")
        print(rows[-1], flush=True)
    text = __doc__.split("\n\n", 1)[1].strip() + f"\n\nSeeds {', '.join(map(str, args.seeds))}.\n\n" + "\n".join(rows)
    write_table(args.name, "PDI inside and outside its training grids and B0 tilts (realistic simulated brains)", text)


if __name__ == "__main__":
    main()
