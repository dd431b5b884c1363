"""How well PDI's sigma ranks its errors, and how well it could: the Spearman(sigma, |error|) goal (issue 12).

Voxelwise Spearman(sigma, |error|) mixes two things: whether sigma follows where the error is large, and how
much sigma varies at all. A single error draw per voxel is a noisy reading of its scale (|N(0, s^2)| spans
0 to 2.5 s), so even an exact sigma ranks single errors only as far as the true scales differ. This prints,
per realistic brain (held-out seeds 31000+, as ``bench_realistic.py``):
- the voxelwise Spearman of the model (the reported metric);
- its ceiling for this sigma map: the Spearman with errors drawn from N(0, sigma^2) themselves (the model
  exactly right about its own scales);
- the regional Spearman: sigma against the local RMS error (both averaged with a Gaussian of 2 and of 4
  voxels inside the mask), which removes the single-draw noise and asks whether sigma follows the error's scale;
- the spread (10th to 90th percentile) of sigma and of the local RMS error (2 voxels), the dynamic range each has;
- what a sigma that followed the error's broad local scale would reach: the Spearman of |error| with the RMS of
  the other voxels' errors around it (Gaussian of 6 voxels, the voxel itself left out; uses the truth, so a
  ceiling for any sigma map of that smoothness, not a method);
- what the error is: the slope of the truth on PDI's map (both demeaned in the mask; 1 for a posterior mean
  that is right on average, above 1 if the map's contrast were merely too low) and the correlation of the
  signed error with the truth's own contrast (truth minus its mask mean; -1 for pure shrinkage towards the
  mean), with the Spearman of |error| against that contrast (uses the truth: what a sigma would need to see).
Writes benchmarks/results/sigma_ranking.md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy import ndimage, stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import write_table  # noqa: E402
from PDIQSMLib.pipeline import Settings, reconstruct  # noqa: E402
from PDIQSMLib.simulation import REALISTIC, make_volume  # noqa: E402


def local_rms(x: np.ndarray, mask: np.ndarray, width: float, leave_out: bool = False) -> np.ndarray:
    """sqrt of the mask-normalised Gaussian average of x^2 (x zero outside the mask); ``leave_out``: each
    voxel's own weight taken out, the scale its neighbours' values give."""
    x2 = np.where(mask, x, 0.0).astype(np.float64) ** 2
    m = mask.astype(np.float64)
    num, den = ndimage.gaussian_filter(x2, width), ndimage.gaussian_filter(m, width)
    if leave_out:
        r = int(4 * width) + 1  # the filter's own radius: the weight at the centre of a unit impulse
        own = ndimage.gaussian_filter(np.pad(np.ones((1, 1, 1)), r), width)[r, r, r]
        num, den = np.maximum(num - own * x2, 0.0), den - own * m
    return np.sqrt(num / np.maximum(den, 1e-6))


def ranking(mean: np.ndarray, std: np.ndarray, truth: np.ndarray, mask: np.ndarray, seed: int = 0) -> dict:
    m = mask > 0
    err = mean - truth
    sigma = std[m].astype(np.float64)
    draw = np.abs(np.random.default_rng(seed).standard_normal(sigma.shape) * sigma)
    row = {"spearman": stats.spearmanr(sigma, np.abs(err[m])).statistic,
           "ceiling for this sigma": stats.spearmanr(sigma, draw).statistic}
    for width in (2, 4):
        row[f"regional, {width} voxels"] = stats.spearmanr(local_rms(std, m, width)[m], local_rms(err, m, width)[m]).statistic
    local = local_rms(err, m, 2)[m]
    row["sigma p10-p90 (ppm)"] = "%.4f-%.4f" % tuple(np.percentile(sigma, [10, 90]))
    row["local RMS error p10-p90 (ppm)"] = "%.4f-%.4f" % tuple(np.percentile(local, [10, 90]))
    scale = local_rms(err, m, 6, leave_out=True)[m]
    row["neighbours' error scale, 6 voxels (truth)"] = stats.spearmanr(scale, np.abs(err[m])).statistic
    x, y = mean[m] - mean[m].mean(), truth[m] - truth[m].mean()
    row["slope of truth on PDI"] = float((x * y).sum() / (x * x).sum())
    row["corr(error, truth contrast)"] = stats.pearsonr(err[m], y).statistic
    row["spearman(abs error, abs truth contrast)"] = stats.spearmanr(np.abs(err[m]), np.abs(y)).statistic
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=[31000, 31001, 31002])
    args = ap.parse_args()
    config = replace(REALISTIC, anatomical_fraction=1.0)
    rows = {}
    for seed in args.seeds:
        s = make_volume(np.random.default_rng(seed), config)
        r = reconstruct(s.field, s.mask, s.geometry, Settings(method="pdi", device="cpu"))
        rows[seed] = ranking(r.mean, r.std, s.chi, s.mask)
        print(seed, rows[seed], flush=True)
    cols = list(next(iter(rows.values())))
    fmt = lambda v: v if isinstance(v, str) else f"{v:.3f}"  # noqa: E731
    lines = ["| brain | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {seed} | " + " | ".join(fmt(r[c]) for c in cols) + " |" for seed, r in rows.items()]
    means = {c: float(np.mean([r[c] for r in rows.values()])) for c in cols if not isinstance(rows[args.seeds[0]][c], str)}
    lines.append("| mean | " + " | ".join(f"{means[c]:.3f}" if c in means else "" for c in cols) + " |")
    write_table("sigma_ranking", "How well PDI's sigma ranks its errors (bundled model, realistic simulated brains)",
                "\n".join(lines))


if __name__ == "__main__":
    main()
