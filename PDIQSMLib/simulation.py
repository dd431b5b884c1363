"""Simulated training and test data: phantoms, their fields by the forward model, noise, patches.

The recipe (documented in the model card): a volume is a procedural brain (probability
``brain_fraction``) or a DeepQSM-style random-shapes volume; voxel size 1 mm in-plane and 1..3 mm
through-plane; B0 tilted from the third voxel axis by up to ``max_tilt_deg``; brains rotated
in-plane by up to +-15 degrees; field = F^-1 D F chi with 1.5x padding, masked; white Gaussian
noise whose standard deviation is log-uniform in ``noise_ppm`` and modulated smoothly in space.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import phantoms
from .geometry import Geometry
from .physics import simulate_field


@dataclass(frozen=True)
class SimulationConfig:
    brain_fraction: float = 0.7
    brain_fov_mm: tuple[float, float, float] = (128.0, 150.0, 120.0)
    shapes_fov_vox: tuple[int, int, int] = (96, 96, 48)
    slice_mm: tuple[float, float] = (1.0, 3.0)
    max_tilt_deg: float = 20.0
    noise_ppm: tuple[float, float] = (3e-4, 6e-3)


@dataclass
class Sample:
    """A simulated volume: truth chi (ppm), mask, noisy local field (ppm) and geometry."""

    chi: np.ndarray
    mask: np.ndarray
    field: np.ndarray
    geometry: Geometry
    noise_ppm: float
    prior: np.ndarray | None = None  # the network's prior input channel, when its architecture has one


def random_b0(rng: np.random.Generator, max_tilt_deg: float) -> tuple[float, float, float]:
    """A unit vector within ``max_tilt_deg`` of the third axis, uniform in azimuth."""
    tilt = np.deg2rad(rng.uniform(0.0, max_tilt_deg))
    az = rng.uniform(0.0, 2 * np.pi)
    return (float(np.sin(tilt) * np.cos(az)), float(np.sin(tilt) * np.sin(az)), float(np.cos(tilt)))


def add_noise(field: np.ndarray, mask: np.ndarray, sigma: np.ndarray | float, rng: np.random.Generator) -> np.ndarray:
    """field + N(0, sigma^2) inside the mask (sigma a scalar or a map), zero outside."""
    noisy = field + sigma * rng.standard_normal(field.shape)
    return np.where(mask, noisy, 0.0).astype(np.float32)


def field_of(chi: np.ndarray, mask: np.ndarray, geometry: Geometry, pad: float = 1.5) -> np.ndarray:
    """Noiseless local field (ppm) of ``chi`` inside ``mask``."""
    b = simulate_field(torch.from_numpy(np.ascontiguousarray(chi, dtype=np.float32)), geometry, pad).numpy()
    return np.where(mask, b, 0.0).astype(np.float32)


def make_volume(rng: np.random.Generator, config: SimulationConfig = SimulationConfig()) -> Sample:
    """One simulated training volume drawn by ``rng``."""
    slice_mm = float(rng.uniform(*config.slice_mm))
    if rng.random() < config.brain_fraction:
        vs = (1.0, 1.0, slice_mm)
        shape = tuple(int(round(f / h)) for f, h in zip(config.brain_fov_mm, vs))
        ph = phantoms.brain(shape, vs, rng, phantoms.random_rotation(rng))
    else:
        vs = (1.0, 1.0, float(rng.choice([1.0, 2.0, slice_mm])))
        ph = phantoms.random_shapes(config.shapes_fov_vox, vs, rng)
        ph.mask = phantoms.smooth_noise(ph.chi.shape, vs, 15.0, rng) > -1.0 if rng.random() < 0.5 else ph.mask
        ph.chi = np.where(ph.mask, ph.chi, 0.0).astype(np.float32)
    geometry = Geometry(vs, random_b0(rng, config.max_tilt_deg))
    field = field_of(ph.chi, ph.mask, geometry)
    sigma = float(np.exp(rng.uniform(*np.log(config.noise_ppm))))
    modulation = np.exp(0.5 * phantoms.smooth_noise(field.shape, vs, 20.0, rng))
    return Sample(ph.chi, ph.mask, add_noise(field, ph.mask, sigma * modulation, rng), geometry, sigma)


def random_patch(sample: Sample, patch: tuple[int, int, int], rng: np.random.Generator,
                 min_fill: float = 0.3, tries: int = 20) -> tuple[np.ndarray, ...]:
    """(field, chi, mask[, prior]) patch of size ``patch`` with at least ``min_fill`` of it inside the mask
    (the prior when the sample has one)."""
    shape = sample.chi.shape
    padded = [max(p - s, 0) for p, s in zip(patch, shape)]
    sources = (sample.field, sample.chi, sample.mask) + ((sample.prior,) if sample.prior is not None else ())
    arrays = [np.pad(a, [(0, p) for p in padded]) for a in sources]
    shape = arrays[0].shape
    best = None
    for _ in range(tries):
        start = [int(rng.integers(0, s - p + 1)) for s, p in zip(shape, patch)]
        sl = tuple(slice(a, a + p) for a, p in zip(start, patch))
        fill = float(arrays[2][sl].mean())
        if best is None or fill > best[0]:
            best = (fill, sl)
        if fill >= min_fill:
            break
    return tuple(a[best[1]] for a in arrays)


def simulated_brain(shape, voxel_size, seed: int, noise_ppm: float, b0_dir=(0.0, 0.0, 1.0)) -> Sample:
    """A procedural brain (seeded) with its local field (2x padding) and white noise: test and demo data."""
    from .phantoms import brain

    rng = np.random.default_rng(seed)
    geometry = Geometry(tuple(voxel_size), b0_dir)
    ph = brain(tuple(shape), geometry.voxel_size, rng)
    field = add_noise(field_of(ph.chi, ph.mask, geometry, pad=2.0), ph.mask, noise_ppm, rng)
    return Sample(ph.chi, ph.mask, field, geometry, noise_ppm)
