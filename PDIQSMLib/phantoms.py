"""Susceptibility phantoms (ppm) for tests, demos and training: analytic shapes, random shapes, brains.

Every generator is seeded through a ``numpy.random.Generator`` and works in millimetres, so the same
anatomy comes out at any voxel size. Values follow METHOD.md: white matter about -0.03 ppm, grey
matter +0.02..0.05, deep grey nuclei 0.05..0.2, veins 0.3..0.6, calcifications negative.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from .geometry import Geometry


@dataclass
class Phantom:
    """A susceptibility map with its brain mask and geometry."""

    chi: np.ndarray  # ppm, float32
    mask: np.ndarray  # bool
    geometry: Geometry


def grid_mm(shape, voxel_size, center=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coordinates (mm) of voxel centres relative to ``center`` (default: the volume's centre, voxels)."""
    c = (np.asarray(shape) - 1) / 2.0 if center is None else np.asarray(center, float)
    axes = [(np.arange(n) - ci) * h for n, ci, h in zip(shape, c, voxel_size)]
    return np.meshgrid(*axes, indexing="ij", sparse=True)


def sphere(shape, voxel_size, radius_mm: float, chi: float, center=None) -> np.ndarray:
    """A uniform sphere of susceptibility ``chi`` (ppm)."""
    x, y, z = grid_mm(shape, voxel_size, center)
    return np.where(x**2 + y**2 + z**2 <= radius_mm**2, chi, 0.0).astype(np.float32)


def spheres_fraction(shape, voxel_size, centres, radii_mm, sub: int = 4) -> np.ndarray:
    """The share of each voxel inside the union of spheres (centres in voxels, radii in mm), float32 in [0, 1].

    A voxel wholly inside or outside every sphere is 1 or 0; one within half its diagonal of a surface is sampled at
    ``sub``^3 points. The partial volume an image has at an object's edge: a sphere voxelised all-or-nothing has a
    staircase surface whose field carries a voxel-scale texture several voxels out (a 1.6 ppm bleed at 0.76 x 0.76 x
    1.8 mm: its second differences 4.6 times the brain's noise three voxels out, 1.2 with partial volume), which a
    smooth real object's field does not."""
    vs = np.asarray(voxel_size, float)
    half = 0.5 * float(np.linalg.norm(vs))
    inside = np.zeros(shape, bool)
    near = np.zeros(shape, bool)
    for centre, radius in zip(centres, radii_mm):
        x, y, z = grid_mm(shape, vs, centre)
        r = np.sqrt(x**2 + y**2 + z**2)
        inside |= r <= radius - half
        near |= np.abs(r - radius) < half
    out = inside.astype(np.float32)
    idx = np.argwhere(near & ~inside).astype(float)
    if len(idx):
        steps = (np.arange(sub) + 0.5) / sub - 0.5
        offsets = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), -1).reshape(-1, 3)
        hits = np.zeros((len(idx), len(offsets)), bool)
        for centre, radius in zip(centres, radii_mm):
            d = (idx[:, None, :] + offsets[None] - np.asarray(centre, float)) * vs
            hits |= (d**2).sum(-1) <= radius**2
        out[tuple(idx.astype(int).T)] = hits.mean(1)
    return out


def cylinder(shape, voxel_size, radius_mm: float, chi: float, axis=(1.0, 0.0, 0.0), center=None) -> np.ndarray:
    """An infinite (edge-to-edge) cylinder of susceptibility ``chi`` along unit vector ``axis`` (voxel axes)."""
    x, y, z = grid_mm(shape, voxel_size, center)
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    along = x * a[0] + y * a[1] + z * a[2]
    r2 = x**2 + y**2 + z**2 - along**2
    return np.where(r2 <= radius_mm**2, chi, 0.0).astype(np.float32)


def sphere_field(shape, voxel_size, radius_mm: float, chi: float, b0_dir, center=None) -> np.ndarray:
    """Analytic field (ppm) of a uniformly magnetised sphere, Lorentz-corrected.

    Zero inside; chi a^3/3 (3 cos^2 theta - 1) / r^3 outside, theta measured from B0.
    """
    x, y, z = grid_mm(shape, voxel_size, center)
    b = np.asarray(b0_dir, float) / np.linalg.norm(b0_dir)
    r2 = x**2 + y**2 + z**2
    r = np.sqrt(np.maximum(r2, 1e-12))
    cos_t = (x * b[0] + y * b[1] + z * b[2]) / r
    outside = chi * radius_mm**3 / 3.0 * (3 * cos_t**2 - 1) / r**3
    return np.where(r > radius_mm, outside, 0.0)


def smooth_noise(shape, voxel_size, scale_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian random field with correlation length ``scale_mm``, unit standard deviation.

    White noise filtered by a Gaussian of width ``scale_mm`` in k-space (periodic, so the cost does
    not grow with the width as a spatial filter's does). On a volume not much larger than ``scale_mm``
    a draw is nearly constant (its mean, the k = 0 term, is all that passes the filter): it is then
    scaled by its mean's size, not by its tiny spread, so its values stay of order 1 (dividing by the
    spread gave values of 1e10 on an 8^3 grid, and exp() of them overflowed in ``make_volume``).
    """
    white = rng.standard_normal(shape).astype(np.float32)
    k2 = 0.0
    for axis, (n, h) in enumerate(zip(shape, voxel_size)):
        f = np.fft.rfftfreq(n) if axis == 2 else np.fft.fftfreq(n)
        view = [1, 1, 1]
        view[axis] = -1
        k2 = k2 + ((2 * np.pi * f / h) ** 2).reshape(view)
    spectrum = torch.fft.rfftn(torch.from_numpy(white)) * torch.from_numpy(np.exp(-0.5 * k2 * scale_mm**2).astype(np.float32))
    f = torch.fft.irfftn(spectrum, s=tuple(shape)).numpy()
    return f / max(float(f.std()), abs(float(f.mean())), 1e-12)


def random_rotation(rng: np.random.Generator, in_plane_deg: float = 15.0, tilt_deg: float = 5.0) -> np.ndarray:
    """Rotation about z by up to ``in_plane_deg`` then about a random in-plane axis by up to ``tilt_deg``."""
    a = np.deg2rad(rng.uniform(-in_plane_deg, in_plane_deg))
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    t = np.deg2rad(rng.uniform(-tilt_deg, tilt_deg))
    rx = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    return rx @ rz


def _ellipsoid(coords, center, semi_axes, rot=np.eye(3)) -> np.ndarray:
    """Boolean ellipsoid; ``coords`` a tuple of broadcastable mm grids."""
    x, y, z = (c - c0 for c, c0 in zip(coords, center))
    u = rot[0, 0] * x + rot[1, 0] * y + rot[2, 0] * z
    v = rot[0, 1] * x + rot[1, 1] * y + rot[2, 1] * z
    w = rot[0, 2] * x + rot[1, 2] * y + rot[2, 2] * z
    return (u / semi_axes[0]) ** 2 + (v / semi_axes[1]) ** 2 + (w / semi_axes[2]) ** 2 <= 1.0


def _anatomical_ellipsoid(coords, rot, voxel_size, center, semi_axes) -> tuple[tuple[slice, ...], np.ndarray]:
    """An axis-aligned ellipsoid in the rotated anatomical frame ``coords`` = R^T (x, y, z), evaluated
    only in its bounding box: (box slices, boolean region within the box)."""
    shape = coords[0].shape
    world = rot @ np.asarray(center, float)  # (x, y, z) = R (u, v, w)
    mid = (np.asarray(shape) - 1) / 2.0
    reach = float(np.max(semi_axes))
    lo = np.maximum(np.floor((world - reach) / voxel_size + mid).astype(int), 0)
    hi = np.minimum(np.ceil((world + reach) / voxel_size + mid).astype(int) + 1, shape)
    sl = tuple(slice(int(a), int(max(a, b))) for a, b in zip(lo, hi))
    return sl, _ellipsoid(tuple(c[sl] for c in coords), center, semi_axes)


def _paint_tube(chi: np.ndarray, voxel_size, start_mm, n_points: int, step_mm: float, radius_mm: float,
                value: float, rng: np.random.Generator, inside: np.ndarray) -> None:
    """Paint a smooth random tube (a vein) of ``value`` into ``chi``, only where ``inside``."""
    vs = np.asarray(voxel_size, float)
    pos = np.asarray(start_mm, float)
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    reach = np.ceil(radius_mm / vs).astype(int) + 1
    for _ in range(n_points):
        direction = direction + 0.35 * rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        pos = pos + step_mm * direction
        c = np.round(pos / vs).astype(int)
        lo = np.maximum(c - reach, 0)
        hi = np.minimum(c + reach + 1, chi.shape)
        if np.any(hi <= lo):
            return
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        gx, gy, gz = np.meshgrid(*[(np.arange(a, b) * h - p) for a, b, h, p in zip(lo, hi, vs, pos)],
                                 indexing="ij", sparse=True)
        ball = (gx**2 + gy**2 + gz**2 <= radius_mm**2) & inside[sl]
        chi[sl][ball] = value


def brain(shape, voxel_size, rng: np.random.Generator, rotation: np.ndarray | None = None) -> Phantom:
    """A procedural brain: folded cortex, white matter, ventricles, deep grey nuclei, veins, calcifications.

    The brain is an ellipsoid sized to the field of view with a perturbed surface; the grey/white
    boundary is folded by band-limited noise (gyri), and every tissue carries smooth variation.
    """
    vs = tuple(float(v) for v in voxel_size)
    fov = np.asarray(shape) * np.asarray(vs)
    rot = np.eye(3) if rotation is None else rotation
    x, y, z = grid_mm(shape, vs)
    # rotated anatomical coordinates (u: left-right, v: posterior-anterior, w: inferior-superior)
    u = rot[0, 0] * x + rot[1, 0] * y + rot[2, 0] * z
    v = rot[0, 1] * x + rot[1, 1] * y + rot[2, 1] * z
    w = rot[0, 2] * x + rot[1, 2] * y + rot[2, 2] * z
    semi = fov / 2.0 * rng.uniform(0.78, 0.9, 3)
    radius = np.sqrt((u / semi[0]) ** 2 + (v / semi[1]) ** 2 + (w / semi[2]) ** 2)
    surface = radius + 0.04 * smooth_noise(shape, vs, 12.0, rng)
    mask = surface <= 1.0
    depth = (1.0 - surface) * float(np.mean(semi))  # approx. mm below the surface

    # Gyri: the cortical ribbon follows a level set of (depth + folding noise), which winds into the
    # white matter; sulcal CSF runs along the ribbon's outer side.
    folds = smooth_noise(shape, vs, rng.uniform(2.5, 4.0), rng)
    level = depth + rng.uniform(5.0, 8.0) * folds
    reach = rng.uniform(9.0, 13.0)
    cortex_mm = rng.uniform(2.5, 4.0)
    gm = mask & ((depth < cortex_mm) | (level < reach)) & (depth < 30.0)
    csf_sulci = gm & (level < reach - cortex_mm) & (depth > 1.0) & (np.abs(folds) < 0.15)

    chi = np.zeros(shape, np.float32)
    wm_val = rng.uniform(-0.045, -0.015)
    chi[mask] = wm_val + 0.012 * smooth_noise(shape, vs, 10.0, rng)[mask]
    gm_val = rng.uniform(0.015, 0.05)
    chi[gm] = gm_val + 0.01 * smooth_noise(shape, vs, 8.0, rng)[gm]
    chi[csf_sulci] = 0.0

    coords = (u, v, w)
    s = semi / np.array([70.0, 85.0, 60.0])  # anatomy scale relative to an adult brain
    ventricle_val = 0.0
    for side in (-1, 1):
        sl, region = _anatomical_ellipsoid(coords, rot, vs, (side * 7 * s[0], 0, 12 * s[2]), (5 * s[0], 24 * s[1], 8 * s[2]))
        chi[sl][region & mask[sl]] = ventricle_val
    nuclei = [  # (centre u, v, w) mm, semi-axes mm, ppm range
        ((11, 10, 14), (4, 12, 6), (0.04, 0.10)),   # caudate
        ((23, 4, 4), (5, 14, 9), (0.05, 0.15)),     # putamen
        ((18, 2, 2), (3, 9, 6), (0.10, 0.25)),      # globus pallidus
        ((11, -14, 8), (8, 13, 8), (0.0, 0.05)),    # thalamus
        ((5, -8, -14), (3, 3, 4), (0.08, 0.18)),    # red nucleus
        ((9, -10, -20), (3, 7, 3), (0.10, 0.20)),   # substantia nigra
    ]
    jitter = rng.normal(0, 1.5, 3)
    texture = 1 + 0.15 * smooth_noise(shape, vs, 4.0, rng)
    for (cu, cv, cw), axes, (lo, hi) in nuclei:
        val = rng.uniform(lo, hi)
        for side in (-1, 1):
            c = ((side * cu + jitter[0]) * s[0], (cv + jitter[1]) * s[1], (cw + jitter[2]) * s[2])
            sl, region = _anatomical_ellipsoid(coords, rot, vs, c, np.asarray(axes) * s)
            region &= mask[sl]
            chi[sl][region] = val * texture[sl][region]

    _add_veins(chi, mask, depth, vs, rng)
    _add_calcifications(chi, mask, vs, rng)
    chi = ndimage.gaussian_filter(chi, [0.5 / h for h in vs]).astype(np.float32)  # partial volume
    chi[~mask] = 0.0
    return Phantom(chi, mask, Geometry(vs, (0.0, 0.0, 1.0)))


def _add_veins(chi, mask, depth, vs, rng) -> None:
    """Cortical veins near the surface and a few deep ones."""
    surface_pts = np.argwhere(mask & (depth < 3.0))
    deep_pts = np.argwhere(mask & (depth > 20.0))
    for pts, count in ((surface_pts, rng.integers(8, 20)), (deep_pts, rng.integers(2, 6))):
        if len(pts) == 0:
            continue
        for idx in rng.choice(len(pts), size=count):
            _paint_tube(chi, vs, pts[idx] * np.asarray(vs), int(rng.integers(10, 40)), 1.5,
                        rng.uniform(0.6, 1.8), rng.uniform(0.3, 0.6), rng, mask)


def _add_calcifications(chi, mask, vs, rng) -> None:
    pts = np.argwhere(mask)
    for idx in rng.choice(len(pts), size=int(rng.integers(0, 4))):
        ball = sphere(chi.shape, vs, rng.uniform(1.0, 3.0), 1.0, center=pts[idx]) > 0
        chi[ball & mask] = rng.uniform(-0.3, -0.1)


def random_shapes(shape, voxel_size, rng: np.random.Generator, n_shapes: int | None = None) -> Phantom:
    """DeepQSM-style volume: overlapping ellipsoids, boxes and cylinders with random values (ppm)."""
    vs = tuple(float(v) for v in voxel_size)
    fov = np.asarray(shape) * np.asarray(vs)
    x, y, z = grid_mm(shape, vs)
    chi = np.zeros(shape, np.float32)
    n = int(rng.integers(15, 40)) if n_shapes is None else n_shapes
    for _ in range(n):
        center = rng.uniform(-0.5, 0.5, 3) * fov
        size = rng.uniform(1.0, 0.25 * fov.min(), 3)
        rot = random_rotation(rng, 180.0, 90.0)
        kind = rng.integers(3)
        if kind == 0:
            region = _ellipsoid((x, y, z), center, size, rot)
        elif kind == 1:
            rel = [(c - c0) for c, c0 in zip((x, y, z), center)]
            region = np.ones(shape, bool)
            for i in range(3):
                proj = rot[0, i] * rel[0] + rot[1, i] * rel[1] + rot[2, i] * rel[2]
                region = region & (np.abs(proj) <= size[i])
        else:
            size[0] = 4 * fov.max()  # long along its own first axis
            region = _ellipsoid((x, y, z), center, size, rot)
        value = rng.choice([rng.uniform(-0.1, 0.15), rng.uniform(-0.3, 0.6)], p=[0.8, 0.2])
        chi[region] = value if rng.random() < 0.5 else chi[region] + value
    chi += (0.02 * smooth_noise(shape, vs, rng.uniform(5, 20), rng)).astype(np.float32)
    chi = ndimage.gaussian_filter(chi, [0.4 / h for h in vs]).astype(np.float32)
    mask = np.ones(shape, bool)
    return Phantom(chi, mask, Geometry(vs, (0.0, 0.0, 1.0)))
