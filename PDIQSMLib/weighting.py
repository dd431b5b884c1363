"""Weights for the data and prior terms, in MEDI's conventions.

- data weight W = mask / N_std, normalised to mean 1 inside the mask (W = mask without a noise map);
- gradient mask M: 1 where the magnitude image has no edge, 0 on edges, so that TV does not smooth
  across anatomical boundaries (M = mask without a magnitude image).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from .errors import InputError
from .gradient import grad


def data_weight(mask: np.ndarray, noise_std: np.ndarray | None = None, source: str = "noise std") -> np.ndarray:
    """W = mask / N_std, normalised to mean 1 inside the mask; float32."""
    m = np.asarray(mask) > 0
    if not m.any():
        raise InputError("mask", "the mask is empty (no voxel > 0)")
    if noise_std is None:
        return m.astype(np.float32)
    n = np.asarray(noise_std, dtype=np.float64)
    if n.shape != m.shape:
        raise InputError(source, f"shape {n.shape} differs from the mask's {m.shape}")
    inside = n[m]
    if not np.all(np.isfinite(inside)) or np.any(inside <= 0):
        raise InputError(source, "noise standard deviation must be positive and finite inside the mask")
    w = np.zeros(m.shape, np.float64)
    w[m] = 1.0 / inside
    w /= w[m].mean()
    return w.astype(np.float32)


def edge_threshold(gradient_magnitude: np.ndarray, n_mask: int, fraction: float = 0.9) -> float:
    """Threshold t with #(components > t) = fraction * n_mask (MEDI's default rule, fraction 0.9)."""
    values = np.sort(gradient_magnitude.ravel())
    count = int(round(fraction * n_mask))
    count = min(max(count, 0), values.size)
    if count == 0:
        return float(values[-1])
    return float(values[values.size - count - 1]) if count < values.size else float(values[0]) - 1.0


def gradient_mask(mask: np.ndarray, magnitude: np.ndarray | None, voxel_size, fraction: float = 0.9) -> np.ndarray:
    """M, shape (3, X, Y, Z): 1 where |grad magnitude| <= threshold inside the mask, else 0."""
    m = np.asarray(mask) > 0
    if magnitude is None:
        return np.broadcast_to(m, (3,) + m.shape).astype(np.float32)
    mag = np.asarray(magnitude, dtype=np.float64)
    if mag.shape != m.shape:
        raise InputError("magnitude", f"shape {mag.shape} differs from the mask's {m.shape}")
    if not np.all(np.isfinite(mag[m])):
        raise InputError("magnitude", "contains NaN or Inf inside the mask")
    g = np.abs(grad(torch.from_numpy(mag * m), voxel_size).numpy())
    t = edge_threshold(g, int(m.sum()), fraction)
    return ((g <= t) & m[None]).astype(np.float32)


# Where no noise map is given: regions whose field is noise, read off the field itself (``noisy_regions``).
NOISY_WINDOW = 5  # voxels: the window of the local medians
NOISY_RATIO = 10.0  # local roughness over the brain's: the factor at which network_io.unreliable_voxels (W < 0.1) acts
NOISY_COHERENCE = 0.2  # and at least this share of the field's local spread: noise, not a steep dipole field
NOISY_FLOOR_PPM = 2e-4  # the brain's level is taken at least this: no measured field is quieter (issue 12: 7e-4 at
# 3 T), and a noiseless simulated field's voxel-scale texture around a sharp source is not noise


def noisy_regions(field: np.ndarray, mask: np.ndarray, erode: int = 1) -> np.ndarray | None:
    """A relative noise std map (1 in the brain) for a field given without one, or None where nothing is noise.

    An acute bleed (or any signal void) leaves a local field that is noise, tens to hundreds of times the brain's;
    fed as data, it ruins PDI (the shared ICH case without its noise map: 380 % demeaned NRMSE) and MEDI. Found here
    from the field alone: the roughness r, the separable second difference (1, -2, 1) along the three axes (white
    noise of std s gives std sqrt(216) s; a field locally polynomial of degree < 2 along any axis gives 0), as a
    robust local std (median of |r| / 0.6745 / sqrt(216) over a ``NOISY_WINDOW``^3 window, the mask's voxels whose
    stencil lies inside it); the brain's level s0 is its median over those voxels (at least ``NOISY_FLOOR_PPM``).
    A voxel is noise where its local roughness is over ``NOISY_RATIO`` s0 and over ``NOISY_COHERENCE`` times the
    field's local spread there (median absolute deviation from the local median): white noise has a roughness equal to
    its spread, a dipole field, even the steep one just outside a bleed, a few hundredths of it, so a field with strong
    sources and noise marks nothing. (A noiseless simulated field of a voxelised 1 ppm sphere does: the staircase's
    field has a voxel-scale texture that looks like noise; partial volume, a 0.75-voxel blur, or any noise removes it.)
    The region is then eroded by ``erode`` voxels (default one): the stencil and the window carry the noise one to two
    voxels beyond it, into the field just outside a bleed that tells most about the bleed (chosen on realistic bleed
    brains of seeds 81000+, benchmarks/results/noisy_regions.md). The noisy voxels get their roughness over s0 as their
    relative noise (so W = 1 / that, normalised, is under a tenth of the brain's there), every other voxel 1."""
    m = np.asarray(mask) > 0
    cube = np.ones((3, 3, 3), bool)
    inner = ndimage.binary_erosion(m, cube)
    if inner.sum() < 1000:
        return None  # too small a brain to tell a region from the rest
    f = np.where(m, np.asarray(field, np.float64), 0.0)
    r = f
    for axis in range(3):
        r = ndimage.correlate1d(r, [1.0, -2.0, 1.0], axis=axis, mode="constant")
    r = np.abs(r) / (0.6745 * np.sqrt(216.0))
    s0 = max(float(np.median(r[inner])), NOISY_FLOOR_PPM)
    r = np.where(inner, r, s0)
    # The medians are slow on a whole brain (2.7 s at 160^3 on one core); a window whose median is over NOISY_RATIO s0
    # has half its values over that, so its mean is over half of it: the medians run only in a box around each group of
    # such windows (a voxel's result reads its own group's voxels and those within two nested medians and the erosion).
    screen = m & (ndimage.uniform_filter(r, size=NOISY_WINDOW, mode="nearest") > 0.5 * NOISY_RATIO * s0)
    out = np.ones(m.shape, np.float32)
    groups, _ = ndimage.label(screen, np.ones((3, 3, 3), bool))
    reach = 2 * NOISY_WINDOW + erode
    for label, found in enumerate(ndimage.find_objects(groups), start=1):
        box = tuple(slice(max(s.start - reach, 0), s.stop + reach) for s in found)
        rough = ndimage.median_filter(r[box], size=NOISY_WINDOW, mode="nearest")
        candidates = (groups[box] == label) & (rough > NOISY_RATIO * s0)
        if not candidates.any():
            continue
        fb = f[box]
        spread = ndimage.median_filter(np.abs(fb - ndimage.median_filter(fb, size=NOISY_WINDOW, mode="nearest")),
                                       size=NOISY_WINDOW, mode="nearest") / 0.6745
        noisy = candidates & (rough > NOISY_COHERENCE * spread)
        if erode > 0:
            noisy = ndimage.binary_erosion(noisy, cube, iterations=erode)
        out[box][noisy] = (rough / s0)[noisy]
    return out if (out > 1).any() else None
