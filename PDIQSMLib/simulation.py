"""Simulated training and test data: phantoms, their fields by the forward model, noise, patches.

The recipe (documented in the model card): a volume is an anatomical brain (the MNI152 template,
deformed and resampled to a random acquisition grid, with one brain's sharp tissue boundaries instead of the
template's averaged ones in a share ``sharp_fraction``; probability ``anatomical_fraction``), a
procedural brain (``brain_fraction`` of the rest) or a DeepQSM-style random-shapes volume; B0 tilted
from the third voxel axis by up to ``max_tilt_deg``; field = F^-1 D F chi with 1.5x padding, masked.
Then what a real local field carries beside ``D chi`` (``realistic``, see fieldterms.py): white-matter
anisotropy, background-field residue, correlated and white noise, a mask off by a voxel or two. Their
amplitudes are drawn so that the fields' cone power share spans the real range (3-10 %, fieldstats.py;
the table is benchmarks/results/field_stats.md). Optionally (``bleed_fraction``; the bundled weights average in a
model trained at 0.5) an anatomical brain gets an acute bleed whose phase is noise, with the noise map that says so
(``add_bleed``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy import ndimage

from . import anatomy, fieldterms, phantoms
from .geometry import Geometry
from .physics import simulate_field


@dataclass(frozen=True)
class SimulationConfig:
    brain_fraction: float = 0.7  # procedural brains among the volumes that are not anatomical
    brain_fov_mm: tuple[float, float, float] = (128.0, 150.0, 120.0)
    shapes_fov_vox: tuple[int, int, int] = (96, 96, 48)
    slice_mm: tuple[float, float] = (1.0, 3.0)
    max_tilt_deg: float = 20.0
    noise_ppm: tuple[float, float] = (3e-4, 6e-3)  # white noise (log-uniform)
    anatomical_fraction: float = 0.0  # MNI152 brains (needs nilearn's package data)
    anatomical_max_shape: tuple[int, int, int] = (144, 144, 96)
    in_plane_mm: tuple[float, float] = (0.6, 1.2)  # anatomical brains' in-plane voxel size
    realistic: bool = False  # add the non-dipolar field terms below
    anisotropy_ppm: tuple[float, float] = (0.005, 0.025)  # white-matter delta chi (uniform)
    residue_ppm: tuple[float, float] = (5e-4, 6e-3)  # background residue std in the mask (log-uniform)
    correlated_ppm: tuple[float, float] = (1.5e-3, 8e-3)  # correlated noise std (log-uniform)
    correlated_width_vox: tuple[float, float] = (0.5, 1.5)
    mask_error_vox: float = 2.0  # mask edge moved by up to this (in 70 % of volumes)
    sharp_fraction: float = 0.0  # anatomical brains with one brain's tissue boundaries (anatomy.sharp_tissue)
    bleed_fraction: float = 0.0  # realistic anatomical brains given an acute bleed and its noise map (add_bleed)
    distant_ppm: tuple[float, float] = (0.0, 0.0)  # distant sources' harmonic field, std in the mask (log-uniform;
    # fieldterms.distant_harmonics); (0, 0): none, and no draw, so that a seed's brain and other terms stay as they were
    column_fraction: float = 0.0  # anatomical brains cut in plane to a column (column_crop); 0: none, and no draw
    column_mm: tuple[float, float] = (60.0, 110.0)  # the column's width along each in-plane axis (uniform)
    texture_fraction: float = 0.0  # anatomical brains with fine tissue texture (anatomy.tissue_texture); no draw at 0


# The realistic recipe: what the bundled model is trained on (TrainConfig's default).
REALISTIC = SimulationConfig(anatomical_fraction=0.6, realistic=True, noise_ppm=(3e-4, 4e-3))


@dataclass
class Sample:
    """A simulated volume: truth chi (ppm), mask, noisy local field (ppm) and geometry."""

    chi: np.ndarray
    mask: np.ndarray
    field: np.ndarray
    geometry: Geometry
    noise_ppm: float
    prior: np.ndarray | None = None  # the network's prior input channel, when its architecture has one
    noise_map: np.ndarray | None = None  # the field's noise std (ppm) where it is not uniform (a bleed), else None


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


def log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(np.exp(rng.uniform(*np.log(bounds))))


def make_volume(rng: np.random.Generator, config: SimulationConfig = SimulationConfig()) -> Sample:
    """One simulated training volume drawn by ``rng``."""
    if config.anatomical_fraction > 0 and rng.random() < config.anatomical_fraction:  # (no draw at 0: old seeds keep their volumes)
        return anatomical_volume(rng, config)
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
    if config.realistic and not ph.mask.all():
        return realistic_sample(ph.chi, ph.mask, geometry, rng, config)
    field = field_of(ph.chi, ph.mask, geometry)
    sigma = log_uniform(rng, config.noise_ppm)
    modulation = np.exp(0.5 * phantoms.smooth_noise(field.shape, vs, 20.0, rng))
    return Sample(ph.chi, ph.mask, add_noise(field, ph.mask, sigma * modulation, rng), geometry, sigma)


def drawn(rng: np.random.Generator, share: float) -> bool:
    """Whether this brain is among ``share`` of them; no draw at 0 or 1, so that a seed keeps its brain sharp or
    textured or not (anatomical_brain draws the boundaries and the texture apart)."""
    return share >= 1 or (share > 0 and rng.random() < share)


def anatomical_volume(rng: np.random.Generator, config: SimulationConfig) -> Sample:
    """An MNI152 brain on a random acquisition grid, with its (realistic, when asked) local field."""
    sharp, texture = drawn(rng, config.sharp_fraction), drawn(rng, config.texture_fraction)
    vs = anatomy.random_grid(rng, config.in_plane_mm, config.slice_mm)
    brain = anatomy.anatomical_brain(rng, vs, config.anatomical_max_shape, sharp=sharp, texture=texture)
    geometry = Geometry(vs, random_b0(rng, config.max_tilt_deg))
    if config.column_fraction > 0 and rng.random() < config.column_fraction:  # no draw at 0: seeds keep their brains
        brain = column_crop(brain, rng, config.column_mm)
    if config.realistic:
        sample = realistic_sample(brain.chi, brain.mask, geometry, rng, config, brain.wm)
        if config.bleed_fraction > 0 and rng.random() < config.bleed_fraction:  # no draw at 0: seeds keep their brains
            sample = add_bleed(sample, rng)[0]
        return sample
    sigma = log_uniform(rng, config.noise_ppm)
    return Sample(brain.chi, brain.mask, add_noise(field_of(brain.chi, brain.mask, geometry), brain.mask, sigma, rng),
                  geometry, sigma)


def column_crop(brain: anatomy.AnatomicalBrain, rng: np.random.Generator,
                width_mm: tuple[float, float] = (60.0, 110.0)) -> anatomy.AnatomicalBrain:
    """``brain`` in a field of view narrower than the head in plane (a high-resolution acquisition's column): along
    each of the first two axes a width drawn from ``width_mm`` around a point in the middle half of the mask's extent,
    where narrower than the volume. The tissue cut off is gone, as a background removal takes its field for
    background: the local field is then that of the column's own tissue, its mask cut by faces along the third axis
    (near B0). PDI trailed MEDI on such columns (session 37, 96 x 96 x 144 mm at 1 mm iso), which training seldom
    showed (a cut only where the in-plane voxel is under about 1 mm)."""
    keep = []
    for axis in range(2):
        n, h = brain.mask.shape[axis], brain.voxel_size[axis]
        width = int(round(rng.uniform(*width_mm) / h))
        along = np.flatnonzero(brain.mask.any(axis=tuple(a for a in range(3) if a != axis)))
        lo, hi = (along[0], along[-1]) if len(along) else (0, n - 1)
        centre = rng.uniform(lo + 0.25 * (hi - lo), hi - 0.25 * (hi - lo))
        start = int(np.clip(round(centre - width / 2), 0, max(n - width, 0)))
        keep.append(slice(start, start + width) if width < n else slice(0, n))
    box = (keep[0], keep[1], slice(None))
    return replace(brain, chi=np.ascontiguousarray(brain.chi[box]), mask=np.ascontiguousarray(brain.mask[box]),
                   wm=np.ascontiguousarray(brain.wm[box]), labels=np.ascontiguousarray(brain.labels[box]))


def realistic_brain(seed: int, voxel_size, b0_dir=(0.0, 0.0, 1.0), max_shape=(144, 144, 96),
                    sharp: bool = False, texture: bool = False) -> tuple[Sample, np.ndarray]:
    """A seeded MNI152 brain on ``voxel_size`` with its realistic local field (``realistic_sample``) and its
    nucleus labels (``anatomy.nucleus_names``), zero outside the sample's mask; ``sharp``: one brain's tissue
    boundaries (``anatomy.sharp_tissue``), the seed's brain otherwise unchanged; ``texture``: fine tissue texture
    (``anatomy.tissue_texture``), the same way."""
    rng = np.random.default_rng(seed)
    brain = anatomy.anatomical_brain(rng, voxel_size, max_shape, sharp=sharp, texture=texture)
    sample = realistic_sample(brain.chi, brain.mask, Geometry(brain.voxel_size, b0_dir), rng, REALISTIC, brain.wm)
    return sample, np.where(sample.mask, brain.labels, 0)


def realistic_sample(chi: np.ndarray, mask: np.ndarray, geometry: Geometry, rng: np.random.Generator,
                     config: SimulationConfig, wm: np.ndarray | None = None) -> Sample:
    """``D chi`` plus the non-dipolar terms of a real local field (fieldterms.py), on a mask that may miss or
    overhang the brain; ``wm`` (white-matter fraction) enables the anisotropy term. ``noise_ppm`` of the
    sample is the std of everything that is not ``D chi`` inside the mask."""
    vs = geometry.voxel_size
    dipole = simulate_field(torch.from_numpy(np.ascontiguousarray(chi, dtype=np.float32)), geometry, 1.5).numpy()
    extra = np.zeros(chi.shape, np.float32)
    if wm is not None:
        directions = fieldterms.fibre_directions(chi.shape, vs, rng)
        extra += fieldterms.anisotropy_field(wm, geometry, rng.uniform(*config.anisotropy_ppm), directions)
    extra += log_uniform(rng, config.residue_ppm) * fieldterms.background_residue(mask, geometry, rng)
    width = rng.uniform(*config.correlated_width_vox)
    extra += log_uniform(rng, config.correlated_ppm) * fieldterms.correlated_noise(chi.shape, rng, width)
    white = log_uniform(rng, config.noise_ppm)
    extra += white * rng.standard_normal(chi.shape).astype(np.float32)
    given = fieldterms.perturbed_mask(mask, vs, rng, config.mask_error_vox) if rng.random() < 0.7 else mask
    overhang = given & ~mask  # no tissue there: the low signal's noise
    extra += np.where(overhang, 3.0 * white * rng.standard_normal(chi.shape), 0.0).astype(np.float32)
    if config.distant_ppm[1] > 0:  # drawn last: the terms above keep their draws
        extra += log_uniform(rng, config.distant_ppm) * fieldterms.distant_harmonics(given, geometry, rng)
    field = np.where(given, dipole + extra, 0.0).astype(np.float32)
    truth = np.where(given, chi, 0.0).astype(np.float32)
    return Sample(truth, given, field, geometry, float(extra[given].std()))


BLEED_NOISE_FACTOR = 20.0  # a bleed's field noise over the brain's (its signal is gone): W there is 0.05 x the median
# The physics puts it higher: where the signal is gone the phase is uniform on (-pi, pi], std pi / sqrt(3) rad, against
# 1 / SNR rad in the brain, so the ratio is about 1.8 SNR, 35-180 for a brain SNR of 20-100 (more with unwrapping
# errors; the shared ICH case's noise map: 800). The training mix keeps 20; benchmarks/noisy_regions.py spans 20-200.


def add_bleed(sample: Sample, rng: np.random.Generator, min_depth_mm: float = 15.0,
              noise_factor: float = BLEED_NOISE_FACTOR) -> tuple[Sample, np.ndarray]:
    """``sample`` (a realistic brain) with an acute bleed, and the bleed's mask: 2-5 overlapping spheres of 4-10 mm
    radius around a point at least ``min_depth_mm`` inside the mask, 0.6-1.6 ppm above the tissue, its dipole field
    added to the sample's field (the field is linear in chi: the brain's non-dipolar terms stay as they were). Its edge
    has the partial volume of an image (``phantoms.spheres_fraction``): chi rises by the bleed's share of each voxel,
    and the mask returned holds the voxels at least half bleed. As in a real bleed, whose signal decays before the
    echo, the phase inside it is noise: a voxel with a share f of bleed keeps 1 - f of its signal, so its noise is the
    brain's level over 1 - f, at most ``noise_factor`` times it (the whole bleed's level: a void's phase is uniform);
    the noise map says so and that much white noise is added (the draws do not depend on the factor: the same seed
    gives the same bleed and noise pattern at every level). A mask with no point that deep gets no bleed (the sample
    unchanged, an empty bleed)."""
    m = sample.mask > 0
    vs = np.asarray(sample.geometry.voxel_size)
    inner = np.argwhere(ndimage.distance_transform_edt(m, sampling=vs) >= min_depth_mm)
    if len(inner) == 0:
        return sample, np.zeros(m.shape, bool)
    if noise_factor < 1:
        raise ValueError(f"a bleed's noise factor must be >= 1, got {noise_factor}")
    centre = inner[int(rng.integers(len(inner)))]
    centres, radii = [], []
    for _ in range(int(rng.integers(2, 6))):
        centres.append(centre + rng.normal(0, 4.0, 3) / vs)  # mm -> voxels
        radii.append(float(rng.uniform(4.0, 10.0)))
    share = np.where(m, phantoms.spheres_fraction(m.shape, vs, centres, radii), 0.0).astype(np.float32)
    raised = float(rng.uniform(0.6, 1.6)) * share
    chi = (sample.chi + raised).astype(np.float32)
    level = float(sample.noise_ppm)
    kept = 1.0 - share.astype(np.float64)  # the share of the voxel's signal left
    relative = np.minimum(1.0 / np.maximum(kept, 1e-12), noise_factor)  # 1 where no bleed: nothing added there
    noise = (level * relative).astype(np.float32)
    extra = rng.standard_normal(m.shape) * (level * np.sqrt(relative**2 - 1.0))
    field = (sample.field + field_of(raised, m, sample.geometry) + extra).astype(np.float32)
    return replace(sample, chi=chi, field=field, noise_map=noise, prior=None), share >= 0.5


def random_patch(sample: Sample, patch: tuple[int, int, int], rng: np.random.Generator,
                 min_fill: float = 0.3, tries: int = 20) -> tuple[np.ndarray, ...]:
    """(field, chi, mask[, prior]) patch of size ``patch`` with at least ``min_fill`` of it inside the mask
    (the prior when the sample has one)."""
    shape = sample.chi.shape
    padded = [max(p - s, 0) for p, s in zip(patch, shape)]
    sources = (sample.field, sample.chi, sample.mask) + ((sample.prior,) if sample.prior is not None else ())
    arrays = [np.pad(a, [(0, p) for p in padded]) for a in sources] if any(padded) else list(sources)
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
