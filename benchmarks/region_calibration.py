"""Calibrate and test the interval of a region's mean (issue 13) on realistic simulated brains.

Brains: MNI152 anatomy with the realistic field terms (``pdiqsm simulate realistic``), on random grids
(0.8-1.2 mm in plane, 1-2.5 mm slices) and B0 tilts; seeds 40000+ calibrate, 41000+ test (training
draws from one stream seeded 0, validation 10000+, sigma calibration 20000+, held-out accuracy 31000+).
Regions: the phantoms' seven deep nuclei, left and right apart (14 a brain). Contrasts: a region's mean
minus the whole-mask mean, for the estimate and for the truth.

Calibration (on the calibration brains only): the correlation length l of the normalised error
(mean - truth) / sigma, read off its autocorrelation (the lag where it falls to exp(-1/2), averaged over
the three axes, in mm); then kappa such that 95 % of the calibration contrasts satisfy
|estimate - truth| <= 1.96 kappa sd(l). Test: the coverage of the 95 % interval on the test brains, for
the calibrated model, for l alone (kappa 1) and for independent voxels. Writes
benchmarks/results/region_calibration.md and, with --write, the calibration beside the bundled weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import write_table  # noqa: E402
from PDIQSMLib import anatomy  # noqa: E402
from PDIQSMLib.geometry import Geometry  # noqa: E402
from PDIQSMLib.pipeline import Settings, reconstruct  # noqa: E402
from PDIQSMLib.regions import NAIVE, Z95, ContrastVariance, ErrorModel, calibration_path  # noqa: E402
from PDIQSMLib.simulation import REALISTIC, random_b0, realistic_sample  # noqa: E402
from PDIQSMLib.weights import DEFAULT_WEIGHTS, sha256  # noqa: E402

MAX_SHAPE = (160, 176, 96)


def brain(seed: int):
    rng = np.random.default_rng(seed)
    vs = anatomy.random_grid(rng, (0.8, 1.2), (1.0, 2.5))
    b = anatomy.anatomical_brain(rng, vs, MAX_SHAPE)
    geometry = Geometry(vs, random_b0(rng, REALISTIC.max_tilt_deg))
    sample = realistic_sample(b.chi, b.mask, geometry, rng, REALISTIC, b.wm)
    labels = np.where(sample.mask, b.labels, 0).astype(int)
    x = np.arange(labels.shape[0])[:, None, None] * np.ones(labels.shape)
    centre = np.argwhere(sample.mask)[:, 0].mean()
    labels = np.where((labels > 0) & (x < centre), labels + 100, labels)  # left and right apart
    return sample, labels


def correlation_length(err: np.ndarray, mask: np.ndarray, voxel_size) -> float:
    """Lag (mm) where the autocorrelation of ``err`` inside the mask falls to exp(-1/2), averaged over axes."""
    e = np.where(mask, err - err[mask].mean(), 0.0)
    m = mask.astype(float)
    shape = [2 * n for n in e.shape]
    f = np.fft.rfftn(e, shape, axes=(0, 1, 2))
    g = np.fft.rfftn(m, shape, axes=(0, 1, 2))
    acf = np.fft.irfftn(np.abs(f) ** 2, shape, axes=(0, 1, 2))
    pairs = np.fft.irfftn(np.abs(g) ** 2, shape, axes=(0, 1, 2))
    lengths = []
    for axis, h in enumerate(voxel_size):
        idx = [0, 0, 0]
        values = []
        for lag in range(0, min(e.shape[axis] // 2, 40)):
            idx[axis] = lag
            values.append(acf[tuple(idx)] / max(pairs[tuple(idx)], 1.0))
        rho = np.array(values) / values[0]
        below = np.nonzero(rho < np.exp(-0.5))[0]
        if below.size == 0:
            lengths.append(len(rho) * h)
            continue
        k = below[0]
        frac = (rho[k - 1] - np.exp(-0.5)) / (rho[k - 1] - rho[k])  # linear between the lags around it
        lengths.append((k - 1 + frac) * h)
    return float(np.mean(lengths))


def contrasts(sample, labels, mean):
    """Per region: (estimate, truth, region weights 1/n) of its mean relative to the whole-mask mean."""
    m = sample.mask
    out = []
    for label in [int(v) for v in np.unique(labels) if v > 0]:
        region = m & (labels == label)
        if region.sum() < 5:
            continue
        u = region / region.sum()
        w = u - m / m.sum()
        out.append((float(np.sum(w * mean)), float(np.sum(w * sample.chi)), u))
    return out


def run(seeds, settings, progress=print):
    cases = []
    for seed in seeds:
        t0 = time.perf_counter()
        sample, labels = brain(seed)
        res = reconstruct(sample.field, sample.mask, sample.geometry, settings)
        err = (res.mean - sample.chi) / np.maximum(res.std, 1e-6)
        length = correlation_length(err, sample.mask, sample.geometry.voxel_size)
        cases.append((sample, labels, res, length))
        progress(f"seed {seed}: shape {sample.chi.shape}, voxel {tuple(round(v, 2) for v in sample.geometry.voxel_size)}, "
                 f"l {length:.1f} mm, {time.perf_counter() - t0:.0f} s")
    return cases


def zscores(cases, model: ErrorModel) -> np.ndarray:
    z = []
    for sample, labels, res, _ in cases:
        m = sample.mask
        sd = ContrastVariance(res.std, model, sample.geometry.voxel_size, m / m.sum())
        for est, truth, u in contrasts(sample, labels, res.mean):
            z.append((est - truth) / sd(u))
    return np.array(z)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibrate", type=int, default=8, help="calibration brains (seeds 40000+)")
    ap.add_argument("--test", type=int, default=8, help="test brains (seeds 41000+)")
    ap.add_argument("--method", default="pdi", choices=("pdi", "pdi-vi2", "pdi-vi1"))
    ap.add_argument("--iterations", type=int, default=30, help="PDI-VI iterations")
    ap.add_argument("--write", action="store_true", help="store the calibration beside the bundled weights")
    ap.add_argument("--name", default="region_calibration")
    ap.add_argument("--use-calibration", help="a stored .regions.json: test only, with its l and kappa")
    args = ap.parse_args()
    settings = Settings(method=args.method, device="cpu",
                        iterations=args.iterations if args.method != "pdi" else None, vi_variant="decoders")
    if args.use_calibration:  # test another method with a stored calibration (e.g. PDI's for PDI-VI)
        stored = json.loads(Path(args.use_calibration).read_text())
        cal, length, kappa = [], float(stored["length_mm"]), float(stored["kappa"])
    else:
        cal = run(range(40000, 40000 + args.calibrate), settings)
        length = float(np.median([c[3] for c in cal]))
        kappa = float(np.percentile(np.abs(zscores(cal, ErrorModel(1.0, length))), 95) / Z95)
    test = run(range(41000, 41000 + args.test), settings)
    models = {"independent voxels (naive)": NAIVE, f"correlated, l = {length:.1f} mm, kappa 1": ErrorModel(1.0, length),
              f"correlated, l = {length:.1f} mm, kappa {kappa:.2f} (calibrated)": ErrorModel(kappa, length)}
    rows = {}
    for name, model in models.items():
        z_test, z_c = zscores(test, model), zscores(cal, model) if cal else np.array([np.nan])
        rows[name] = {"coverage_calibration": float(np.mean(np.abs(z_c) <= Z95)),
                      "coverage_test": float(np.mean(np.abs(z_test) <= Z95)),
                      "median_abs_z_test": float(np.median(np.abs(z_test))), "regions_test": int(z_test.size)}
    bias = []
    for sample, labels, res, _ in test:
        bias += [est - truth for est, truth, _ in contrasts(sample, labels, res.mean)]
    lines = [f"| error model | coverage, calibration brains ({len(cal)}) | coverage, test brains ({args.test}) | "
             "median |z|, test | regions, test |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        cal_cell = "n/a (stored)" if not cal else f"{100 * r['coverage_calibration']:.1f} %"
        lines.append(f"| {name} | {cal_cell} | {100 * r['coverage_test']:.1f} % | "
                     f"{r['median_abs_z_test']:.2f} | {r['regions_test']} |")
    lines.append("")
    lines.append(f"Method {args.method}" + (f" (VI: {args.iterations} iterations, decoders)" if args.method != "pdi" else "")
                 + (f"; l and kappa from {args.use_calibration}" if args.use_calibration else "")
                 + "; correlation length per calibration brain (mm): "
                 f"{', '.join(f'{c[3]:.1f}' for c in cal)}; test brains: {', '.join(f'{c[3]:.1f}' for c in test)}.")
    lines.append(f"Region contrast error on the test brains (estimate - truth, ppm): mean {np.mean(bias):+.4f}, "
                 f"RMS {np.sqrt(np.mean(np.square(bias))):.4f}, worst {np.max(np.abs(bias)):.4f}.")
    write_table(args.name, f"Interval of a region's mean: coverage on realistic simulated brains ({args.method})",
                __doc__.split("\n\n", 1)[1].strip() + "\n\n" + "\n".join(lines))
    if args.write and args.method == "pdi" and not args.use_calibration:
        path = calibration_path(DEFAULT_WEIGHTS)
        path.write_text(json.dumps({"weights_sha256": sha256(DEFAULT_WEIGHTS), "kappa": round(kappa, 4),
                                    "length_mm": round(length, 3),
                                    "source": f"{args.calibrate} realistic simulated brains (seeds 40000+), "
                                              "benchmarks/region_calibration.py",
                                    "coverage_test": rows[list(rows)[-1]]["coverage_test"]}, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
