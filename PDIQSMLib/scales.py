"""PDI on grids finer than its training's: the coarse band of the map read where the network learnt it.

The dipole kernel depends on the direction of k only, so on an isotropic grid the physics is the same at any voxel
size; what changes is the anatomy's size in voxels. A network trained on 0.6-1.2 mm voxels sees a 0.5 mm brain as a
brain twice its size, and on realistic simulated brains at 0.5 mm it lost its lead over MEDI (61.4 against 60.5 %
demeaned, against 2.9-7.6 points ahead on its own grids; ``benchmarks/results/domain.md``). So on a finer grid the
field is also block-averaged by an integer factor per axis onto a grid the network knows, the network maps that,
and its map replaces the fine map's coarse band: ``U(PDI(coarse)) + PDI(fine) - U(B(PDI(fine)))``, with B the
masked block mean and U the trilinear upsampling normalised by the mask's. Each axis is read against its own
training range: in plane 0.6-1.2 mm, but the third axis (B0's, the slices) 1-3 mm. The blocks take one factor for all
axes when that keeps every side in range (0.5 x 0.5 x 1 mm -> 1 x 1 x 2, the voxel's shape kept), else the least
per axis (a 0.64 mm isotropic grid -> 0.64 x 0.64 x 1.28). Chosen on realistic brains of seeds 45000-45003: at
0.64-0.9 mm iso, 1 x 1 x 2 blocks 0.2-5.7 points better than none on all 16, and than 2 x 2 x 2 on 15; at
0.5 x 0.5 x 1 mm, 2 x 2 x 2 blocks 0.8-1.9 better than 2 x 2 x 1 on all 4; checked on five others in
``benchmarks/results/domain_slices.md``. The fine run keeps every detail finer
than a block; the coarse run sets everything coarser. The forward model is linear and shift-invariant, so the
block-averaged field is the field of the block-averaged map (0.6 % apart inside a simulated brain, the two grids'
discrete kernels; ``test_scales.py``): the coarse field is a field the network can read.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def coarse_factors(voxel_size, finest_mm, coarsest_mm=None) -> tuple[int, int, int] | None:
    """Integer block sizes per axis that bring each voxel side to at least ``finest_mm`` (the finest the network was
    trained on: one side for all axes, or one per axis, in the network's axis order), or None when no axis is finer
    than that. Where one factor for all three axes keeps every side within ``coarsest_mm`` (the training's coarsest,
    likewise), that is taken instead: the blocks then keep the voxel's shape, so the coarse grid is the same volume
    at a coarser scale (the dipole kernel depends on k's direction only)."""
    if not finest_mm:
        return None
    sides = lambda x: (x,) * 3 if isinstance(x, (int, float)) else tuple(x)  # noqa: E731
    f = tuple(max(1, math.ceil(float(t) / float(v) - 1e-9)) for v, t in zip(voxel_size, sides(finest_mm)))
    if not any(x > 1 for x in f):
        return None
    k = max(f)
    if coarsest_mm and all(k * float(v) <= float(c) + 1e-9 for v, c in zip(voxel_size, sides(coarsest_mm))):
        return (k, k, k)
    return f


def _padded(x: np.ndarray, f) -> np.ndarray:
    return np.pad(x, [(0, (-n) % k) for n, k in zip(x.shape, f)])


def _blocks(x: np.ndarray, f) -> np.ndarray:
    s = x.shape
    return x.reshape(s[0] // f[0], f[0], s[1] // f[1], f[1], s[2] // f[2], f[2]).sum(axis=(1, 3, 5))


def block_mean(x: np.ndarray, mask: np.ndarray, f) -> tuple[np.ndarray, np.ndarray]:
    """(the mean of ``x`` over each block's mask voxels, the blocks more than half inside the mask; zero elsewhere);
    the grid is padded at its far ends to whole blocks. Fine voxels in no such block, nor near one, keep the fine
    map in ``combined`` (both its coarse terms are zero there)."""
    m = _padded(np.asarray(mask) > 0, f).astype(np.float64)
    count = _blocks(m, f)
    total = _blocks(_padded(np.asarray(x, np.float64), f) * m, f)
    inside = 2 * count > np.prod(f)  # a block is brain where most of it is (a sliver of brain has no coarse field)
    return np.where(inside, total / np.maximum(count, 1.0), 0.0), inside


def upsample(xc: np.ndarray, mc: np.ndarray, f, shape) -> np.ndarray:
    """Trilinear upsampling of a block grid's values inside ``mc`` back to the fine ``shape``, normalised by the
    upsampled mask (so blocks outside it do not pull the edge towards zero); block centres are the coarse samples."""
    def up(a: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(a, np.float64))[None, None]
        scale = tuple(float(k) for k in f)
        return F.interpolate(t, scale_factor=scale, mode="trilinear", align_corners=False)[0, 0].numpy()

    mc = np.asarray(mc, np.float64)
    weight = up(mc)
    out = up(np.asarray(xc, np.float64) * mc) / np.maximum(weight, 1e-12)
    out = np.where(weight > 1e-12, out, 0.0)
    return out[: shape[0], : shape[1], : shape[2]]


def coarse_band(x: np.ndarray, mask: np.ndarray, f) -> np.ndarray:
    """What of ``x`` the block grid holds, back on the fine grid: ``U(B(x))``."""
    xc, mc = block_mean(x, mask, f)
    return upsample(xc, mc, f, np.asarray(x).shape)


def combined(fine: np.ndarray, coarse: np.ndarray, coarse_mask: np.ndarray, mask: np.ndarray, f) -> np.ndarray:
    """The fine map with its coarse band replaced by the coarse map's: ``U(coarse) + fine - U(B(fine))`` inside
    ``mask``, zero outside."""
    m = np.asarray(mask) > 0
    out = upsample(coarse, coarse_mask, f, m.shape) + np.asarray(fine, np.float64) - coarse_band(fine, m, f)
    return np.where(m, out, 0.0).astype(np.asarray(fine).dtype)
