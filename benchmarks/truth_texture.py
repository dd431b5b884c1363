"""How fine the simulated truth is against a real brain's susceptibility map, and what fine tissue texture does to
each method.

The one susceptibility map of a real brain this team holds is the shared ICH case (``../shared/data/ich_simulation``:
a map derived from a real brain with a simulated bleed, 1 x 1 x 3 mm, B0 along the third axis; read here outside
the bleed and 3 voxels inside the mask's edge). Part 1 sets its in-plane power spectrum (per slice, averaged over
slices, per unit of k-area, in bands of cycles per voxel) beside the simulator's MNI152 brains on the same grid
(``anatomy.anatomical_brain``: the template's boundaries, one brain's, and one brain's with fine tissue texture,
``anatomy.tissue_texture``), and three readings of the fine scale: the std above a 1- and a 2-voxel in-plane blur
and the mean in-plane gradient (ppm per voxel). The real map is a reconstruction: part of its fine power may be
its noise, and its regularisation may have taken some away; its spectrum falls steadily (no white floor).
Part 2: realistic held-out brains (``simulation.realistic_brain``, 1 mm iso, B0 along z, seeds 31000+), each with
and without texture (the same brain, grid and field terms otherwise), demeaned NRMSE % of each method's defaults
(lower is better) and of Tikhonov at fixed lambdas. Writes benchmarks/results/truth_texture.md (--name).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import write_table  # noqa: E402
from PDIQSMLib import anatomy  # noqa: E402
from PDIQSMLib.metrics import nrmse_demeaned  # noqa: E402
from PDIQSMLib.pipeline import Settings, reconstruct  # noqa: E402
from PDIQSMLib.simulation import realistic_brain  # noqa: E402

BANDS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)  # cycles per voxel, in plane
ICH = ROOT.parent / "shared" / "data" / "ich_simulation"
TIKHONOV_FIXED = (5e-3, 1e-2, 2e-2, 5e-2)


def inner_region(chi: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The mask 3 voxels in, without a bleed (chi > 0.5 ppm over more than 1000 voxels, dilated by 3)."""
    strong = chi > 0.5
    bleed = ndimage.binary_dilation(strong, iterations=3) if strong.sum() > 1000 else np.zeros_like(mask)
    return ndimage.binary_erosion(mask, iterations=3) & ~bleed


def in_plane_spectrum(chi: np.ndarray, region: np.ndarray) -> list[float]:
    """Mean power per band of BANDS (2D FFT of each slice of the demeaned map in ``region``, summed over slices,
    per voxel of the region)."""
    x = np.where(region, chi - chi[region].mean(), 0.0)
    power = (np.abs(np.fft.fft2(x, axes=(0, 1))) ** 2).sum(2) / region.sum()
    kx, ky = np.meshgrid(*[np.fft.fftfreq(n) for n in x.shape[:2]], indexing="ij")
    k = np.hypot(kx, ky)
    return [float(power[(k >= lo) & (k < hi)].mean()) for lo, hi in zip(BANDS[:-1], BANDS[1:])]


def fine_readings(chi: np.ndarray, region: np.ndarray) -> list[float]:
    """Std above a 1- and a 2-voxel in-plane Gaussian blur, and the mean in-plane gradient magnitude, in ``region``."""
    out = [float((chi - ndimage.gaussian_filter(chi, (s, s, 0)))[region].std()) for s in (1.0, 2.0)]
    return out + [float(np.hypot(*np.gradient(chi, axis=(0, 1)))[region].mean())]


def part1(seeds) -> list[str]:
    import nibabel as nib

    chi = nib.load(ICH / "chi_ppm.nii.gz").get_fdata(dtype=np.float32)
    mask = nib.load(ICH / "mask.nii.gz").get_fdata() > 0
    region = inner_region(chi, mask)
    real = in_plane_spectrum(chi, region)
    head = ("| map | " + " | ".join(f"{lo}-{hi}" for lo, hi in zip(BANDS[:-1], BANDS[1:]))
            + " | std above 1-voxel blur | above 2-voxel | mean gradient |")
    rows = ["Power per band (ppm^2 per voxel; the real map's in full, the simulated ones as the real map's power over "
            "theirs: 1 is a match, above 1 the simulator lacks power there):", "", head,
            "|---|" + "---|" * (len(BANDS) + 2),
            "| real-derived (shared ICH case, outside the bleed) | " + " | ".join(f"{p:.2e}" for p in real) + " | "
            + " | ".join(f"{v:.4f}" for v in fine_readings(chi, region)) + " |"]
    for label, sharp, texture in (("template boundaries", False, False), ("one brain's boundaries", True, False),
                                  ("one brain's boundaries + texture", True, True)):
        ratios, fine = [], []
        for seed in seeds:
            b = anatomy.anatomical_brain(np.random.default_rng(seed), (1.0, 1.0, 3.0), max_shape=(256, 256, 80),
                                         sharp=sharp, texture=texture)
            r = inner_region(b.chi, b.mask)
            ratios.append(np.asarray(real) / np.asarray(in_plane_spectrum(b.chi, r)))
            fine.append(fine_readings(b.chi, r))
        rows.append(f"| simulated, {label} (mean of {len(seeds)}) | "
                    + " | ".join(f"{v:.1f}" for v in np.mean(ratios, 0)) + " | "
                    + " | ".join(f"{v:.4f}" for v in np.mean(fine, 0)) + " |")
        print(rows[-1], flush=True)
    return rows


def part2(seeds, weights, vi: bool, fixed: bool) -> list[str]:
    methods = [("tkd", {}), ("tikhonov", {}), ("medi", {}), ("pdi", {"device": "cpu"})]
    methods += [(f"pdi {Path(w).stem}", {"device": "cpu", "weights": w}) for w in weights]
    methods += [("pdi-vi1", {"device": "cpu"})] if vi else []
    methods += [(f"tikhonov {lam:g}", {"lam": lam}) for lam in TIKHONOV_FIXED] if fixed else []
    names = [m for m, _ in methods]
    rows = ["| truth | " + " | ".join(names) + " | seconds |", "|---|" + "---|" * (len(names) + 1)]
    for texture in (False, True):
        t0 = time.perf_counter()
        scores: dict[str, list[float]] = {}
        for seed in seeds:
            s = realistic_brain(seed, (1.0, 1.0, 1.0), (0.0, 0.0, 1.0), (144, 144, 96), texture=texture)[0]
            for method, extra in methods:
                r = reconstruct(s.field, s.mask, s.geometry, Settings(method=method.split()[0], **extra))
                scores.setdefault(method, []).append(nrmse_demeaned(r.mean, s.chi, s.mask))
                if "vi_where" in r.info:
                    print(seed, method, "gate", r.info["vi_where"]["gate"], "kept", r.info["vi_where"]["kept"], flush=True)
            print("texture" if texture else "smooth", seed, {k: round(v[-1], 2) for k, v in scores.items()}, flush=True)
        rows.append(f"| {'with' if texture else 'without'} fine texture | "
                    + " | ".join(f"{np.mean(scores[m]):.2f}" for m in names) + f" | {time.perf_counter() - t0:.0f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spectrum-seeds", type=int, nargs="*", default=[40000, 40001, 40002])
    parser.add_argument("--seeds", type=int, nargs="*", default=[31000, 31001, 31002, 31003, 31004])
    parser.add_argument("--weights", nargs="*", default=[], help="PDI weights files, a column each in part 2")
    parser.add_argument("--parts", default="1,2")
    parser.add_argument("--vi", action="store_true", help="part 2: a PDI-VI1 column (defaults)")
    parser.add_argument("--no-fixed", action="store_true", help="part 2: without Tikhonov's fixed-lambda columns")
    parser.add_argument("--texture-ppm", type=float, nargs=2, metavar=("LO", "HI"),
                        help="the texture's std range in place of anatomy.TEXTURE_PPM (e.g. 0.015 0.015: one level)")
    parser.add_argument("--name", default="truth_texture", help="the table's name: benchmarks/results/NAME.md")
    args = parser.parse_args()
    parts = args.parts.split(",")
    text = __doc__.split("\n\n", 1)[1].strip()
    if args.texture_ppm:
        anatomy.TEXTURE_PPM = tuple(args.texture_ppm)
        text += f"\n\nTexture std drawn from {args.texture_ppm[0]:g}-{args.texture_ppm[1]:g} ppm (--texture-ppm)."
    if "1" in parts:
        text += "\n\n## 1. The truth's fine scale\n\n" + "\n".join(part1(args.spectrum_seeds))
    if "2" in parts:
        text += (f"\n\n## 2. Methods on brains with and without texture (seeds {', '.join(map(str, args.seeds))})\n\n"
                 + "\n".join(part2(args.seeds, args.weights, args.vi, not args.no_fixed)))
    write_table(args.name, "The simulated truth's fine scale against a real brain's map", text)


if __name__ == "__main__":
    main()
