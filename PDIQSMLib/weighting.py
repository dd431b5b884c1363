"""Weights for the data and prior terms, in MEDI's conventions.

- data weight W = mask / N_std, normalised to mean 1 inside the mask (W = mask without a noise map);
- gradient mask M: 1 where the magnitude image has no edge, 0 on edges, so that TV does not smooth
  across anatomical boundaries (M = mask without a magnitude image).
"""

from __future__ import annotations

import numpy as np
import torch

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
