"""Brains with real anatomy: susceptibility phantoms built on the MNI152 2009a symmetric template.

nilearn's wheel carries the ICBM 2009a symmetric T1 and grey- and white-matter probability maps at
1 mm; the probability maps are read here (package data; with nibabel, nilearn itself is never imported, nothing is downloaded).
Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological
Institute, McGill University (Fonov et al., NeuroImage 2011 and 2009; Collins et al., 1999); the
notice travels with the model card. Each phantom draws tissue values from published ranges
(METHOD.md), places the deep grey nuclei at their MNI positions (restricted by the template's grey
matter), adds veins, calcifications and microbleeds, deforms the anatomy (rotation, scaling, smooth
elastic displacement) and resamples it to a random acquisition grid with partial-volume blurring. On
request the template's averaged tissue boundaries are first made as sharp as one brain's (``sharp_tissue``).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from .phantoms import _add_calcifications, _add_veins, random_rotation, smooth_noise, sphere

TEMPLATE_NAME = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
MNI_ORIGIN_VOX = np.array([98.0, 134.0, 72.0])  # voxel index of MNI (0, 0, 0) in nilearn's 1 mm files

# Deep grey nuclei: MNI centre (mm, right hemisphere; mirrored to the left), semi-axes (mm), ppm range
# (published 3 T values relative to CSF; e.g. Li et al. 2014, Lim et al. 2013), and whether the
# template's grey-matter map delineates the nucleus (the globus pallidus and the brainstem nuclei
# look like white matter on T1, so their ellipsoid is used as it is).
NUCLEI = (
    ("caudate", (13, 12, 10), (4.5, 9, 7), (0.04, 0.10), True),
    ("putamen", (25, 2, 1), (5.5, 13, 9), (0.03, 0.12), True),
    ("globus pallidus", (19, -3, -1), (3.5, 7, 5), (0.10, 0.25), False),
    ("thalamus", (11, -18, 7), (7, 11, 7), (0.00, 0.05), True),
    ("red nucleus", (5, -20, -8), (3, 3.5, 3.5), (0.07, 0.18), False),
    ("substantia nigra", (10, -18, -12), (3, 7, 2.5), (0.10, 0.22), False),
    ("dentate nucleus", (15, -57, -34), (6, 8, 5), (0.05, 0.15), False),
)


def nucleus_names() -> dict[int, str]:
    """The label of each nucleus in ``AnatomicalBrain.labels`` (index in NUCLEI + 1) and its name."""
    return {index: nucleus[0] for index, nucleus in enumerate(NUCLEI, start=1)}


@dataclass
class AnatomicalBrain:
    """A resampled brain: chi (ppm, isotropic part), brain mask, white-matter probability (for the
    anisotropy term) and the region labels of the nuclei (index in NUCLEI + 1), on a grid of
    ``voxel_size`` (mm)."""

    chi: np.ndarray
    mask: np.ndarray
    wm: np.ndarray
    labels: np.ndarray
    voxel_size: tuple[float, float, float]


def template_dir() -> Path:
    """Folder of nilearn's packaged MNI152 files (found without importing nilearn)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the anatomical phantoms read the MNI152 template from nilearn's wheel, which is not "
                           "installed: pip install 'PDIQSMLib[train]' (or --simulator clean)")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def available() -> bool:
    """Whether the MNI152 template files can be read here."""
    try:
        return (template_dir() / TEMPLATE_NAME.format("gm")).exists()
    except RuntimeError:
        return False


@functools.lru_cache(maxsize=1)
def templates() -> dict[str, np.ndarray]:
    """Grey and white matter (0..1, float32, 1 mm, the MNI voxel grid cropped to the brain), the brain
    mask, its depth (mm below the surface) and the voxel of MNI (0, 0, 0)."""
    import nibabel as nib

    folder = template_dir()
    maps = {n: nib.load(folder / TEMPLATE_NAME.format(n)).get_fdata(dtype=np.float32) / 255.0 for n in ("gm", "wm")}
    tissue = maps["gm"] + maps["wm"]
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(tissue > 0.4, iterations=3))  # ventricles included
    brain &= ndimage.binary_opening(tissue > 0.05, iterations=1) | (tissue <= 0.05)  # no stray voxels
    brain = ndimage.binary_fill_holes(brain)
    idx = np.argwhere(brain)
    box = tuple(slice(int(max(a, 0)), int(b)) for a, b in zip(idx.min(0) - 4, idx.max(0) + 5))  # the brain, 4 mm margin
    maps = {n: np.ascontiguousarray(m[box]) for n, m in maps.items()}
    maps["mask"] = brain[box]
    maps["depth"] = ndimage.distance_transform_edt(maps["mask"]).astype(np.float32)  # mm below the surface
    maps["origin"] = MNI_ORIGIN_VOX - np.array([b.start for b in box])  # voxel of MNI (0, 0, 0) in the crop
    return maps


def _ellipsoid_box(shape, centre_vox, semi_mm) -> tuple[tuple[slice, ...], np.ndarray]:
    """An axis-aligned ellipsoid on a 1 mm grid, evaluated in its bounding box: (box, region in the box)."""
    lo = np.maximum(np.floor(np.asarray(centre_vox) - semi_mm).astype(int), 0)
    hi = np.minimum(np.ceil(np.asarray(centre_vox) + semi_mm).astype(int) + 1, shape)
    box = tuple(slice(int(a), int(max(a, b))) for a, b in zip(lo, hi))
    grids = np.ogrid[box]
    return box, sum(((g - c) / s) ** 2 for g, c, s in zip(grids, centre_vox, semi_mm)) <= 1.0


# Individual tissue boundaries (``sharp_tissue``): the logistic width, in tissue probability, of the sharpened
# boundaries and the amplitude of the fine (1.5 mm) displacement that moves them, both drawn per brain.
SHARP_WIDTH = (0.03, 0.1)
SHARP_JITTER = (0.05, 0.2)
SHARP_JITTER_MM = 1.5


def sharp_tissue(gm: np.ndarray, wm: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Grey- and white-matter maps with the boundaries of one brain rather than of an average of 152.

    The MNI152 maps are probabilities averaged over registered brains: their cortical ribbon and sulci are
    smeared over several millimetres, which no single brain's tissue is. Here tissue (gm + wm against CSF) and
    white matter (its share of the tissue) are each pushed through a steep logistic around 0.5, after a smooth
    random offset of correlation length 1.5 mm, largest where the template is least sure (4 p (1 - p) of it),
    moves the boundary by a voxel or two, so that each brain gets its own fine folding. gm + wm stays within
    [0, 1]; where the template is sure (probability near 0 or 1) nothing changes. Measured (session 15, six
    brains at 1.06 mm, B0 along z): the dipole field's std in the mask is 0.0083 ppm (0.0064-0.0098) against
    0.0071 (0.0057-0.0081) for the same brains with the template's boundaries, each brain higher; the real 3 T
    brain's COSMOS dipole field has 0.0084 (issue 12 quotes 0.0088 with 0.0026 ppm white noise added; the table:
    benchmarks/results/field_stats.md, last section)."""
    width, jitter = rng.uniform(*SHARP_WIDTH), rng.uniform(*SHARP_JITTER)
    vs = (1.0, 1.0, 1.0)
    tissue = gm + wm

    def steep(p: np.ndarray) -> np.ndarray:  # the offset fades where the template is sure (p near 0 or 1)
        x = (p - 0.5 + jitter * 4.0 * p * (1.0 - p) * smooth_noise(p.shape, vs, SHARP_JITTER_MM, rng)) / width
        return 0.5 * (1.0 + np.tanh(0.5 * x))  # the logistic, without overflow

    sharp_tissue_map, white_share = steep(tissue), steep(wm / np.maximum(tissue, 1e-3))
    return ((sharp_tissue_map * (1.0 - white_share)).astype(np.float32),
            (sharp_tissue_map * white_share).astype(np.float32))


# Fine tissue texture (``tissue_texture``): std in tissue (ppm, drawn per brain), the knee and slope of its power
# law (cycles / mm) and the frequency below which it fades (the anatomy's own scales). Measured against the one
# susceptibility map of a real brain this team holds (the shared ICH case outside its bleed, 1 x 1 x 3 mm;
# benchmarks/truth_texture.py, session 40): its in-plane power spectrum falls as k^-3 from 0.15 to 0.45 cycles per
# voxel and stands 2.4-12 times above the template brains' (sharp or not) there, whose truth is cartoon-smooth
# below 7 mm; 0.035 ppm brought the two spectra within 0.8-1.3 of each other on one sharp brain. The range spans
# half to more than that, as part of the real map's fine power may be its reconstruction's (the draws: 0.8-2.3).
TEXTURE_PPM = (0.015, 0.045)
TEXTURE_KNEE = 0.1
TEXTURE_SLOPE = 3.0  # power ~ k^-slope above the knee
TEXTURE_LOW = 0.08


def tissue_texture(shape, rng: np.random.Generator, voxel_mm: float = 1.0) -> np.ndarray:
    """A Gaussian random field of unit std (float32) on an isotropic grid whose power falls as
    ``k^-TEXTURE_SLOPE`` above ``TEXTURE_KNEE`` cycles / mm and fades below ``TEXTURE_LOW`` (periodic): the fine,
    multi-scale heterogeneity of real tissue (iron and myelin within a structure, small vessels below the grid)
    that smooth tissue maps lack."""
    k2 = 0.0
    for axis, n in enumerate(shape):
        f = (np.fft.rfftfreq(n) if axis == len(shape) - 1 else np.fft.fftfreq(n)) / voxel_mm
        view = [1] * len(shape)
        view[axis] = -1
        k2 = k2 + (f**2).reshape(view)
    gain = (1.0 + k2 / TEXTURE_KNEE**2) ** (-TEXTURE_SLOPE / 4.0) * (k2 / (k2 + TEXTURE_LOW**2))
    white = rng.standard_normal(shape).astype(np.float32)
    field = np.fft.irfftn(np.fft.rfftn(white) * gain, s=shape, axes=tuple(range(len(shape))))
    return (field / field.std()).astype(np.float32)


def susceptibility_1mm(rng: np.random.Generator, sharp: np.random.Generator | None = None,
                       texture: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(chi in ppm, nucleus labels, white-matter fraction) on the template's 1 mm grid, tissue values drawn by
    ``rng``; ``sharp``: the tissue boundaries of one brain (``sharp_tissue``), drawn by this generator, not the
    template's average (a generator of its own, so that a seed gives the same brain either way); ``texture``: fine
    tissue texture (``tissue_texture``, std drawn from TEXTURE_PPM, weighted by the tissue fraction, veins and
    calcifications painted over it), drawn by this generator."""
    t = templates()
    shape, vs = t["gm"].shape, (1.0, 1.0, 1.0)
    mask = t["mask"]
    gm, wm = sharp_tissue(t["gm"], t["wm"], sharp) if sharp is not None else (t["gm"], t["wm"])
    wm_chi = rng.uniform(-0.045, -0.015) + 0.010 * smooth_noise(shape, vs, 10.0, rng)
    gm_chi = rng.uniform(0.015, 0.05) + 0.008 * smooth_noise(shape, vs, 8.0, rng)
    chi = (wm * wm_chi + gm * gm_chi).astype(np.float32)  # CSF (the rest) is the 0 ppm reference
    labels = np.zeros(shape, np.uint8)
    grain = 1.0 + 0.15 * smooth_noise(shape, vs, 4.0, rng)  # within the nuclei
    shift = rng.normal(0.0, 1.0, 3)
    for index, (_, centre, semi, (lo, hi), by_gm) in enumerate(NUCLEI, start=1):
        value = rng.uniform(lo, hi)
        for side in (1, -1):
            c = t["origin"] + np.array([side * centre[0], centre[1], centre[2]]) + shift
            box, region = _ellipsoid_box(shape, c, np.asarray(semi) * rng.uniform(0.9, 1.1))
            region &= mask[box]
            if by_gm:
                region &= t["gm"][box] > 0.35
            chi[box][region] = value * grain[box][region]
            labels[box][region] = index
    if texture is not None:
        chi += (texture.uniform(*TEXTURE_PPM) * np.clip(gm + wm, 0.0, 1.0) * tissue_texture(shape, texture)
                ).astype(np.float32)
    _add_veins(chi, mask, t["depth"], vs, rng)
    _add_calcifications(chi, mask, vs, rng)
    _add_microbleeds(chi, mask, vs, rng)
    chi[~mask] = 0.0
    return chi, labels, wm


def _add_microbleeds(chi, mask, vs, rng, chance: float = 0.3) -> None:
    """With probability ``chance``, a few small strongly paramagnetic spheres (haemosiderin)."""
    if rng.random() >= chance:
        return
    pts = np.argwhere(mask)
    for idx in rng.choice(len(pts), size=int(rng.integers(1, 4))):
        ball = sphere(chi.shape, vs, rng.uniform(1.0, 3.0), 1.0, center=pts[idx]) > 0
        chi[ball & mask] = rng.uniform(0.3, 1.0)


def random_grid(rng: np.random.Generator, in_plane_mm=(0.6, 1.2), slice_mm=(1.0, 3.0)) -> tuple[float, float, float]:
    """An acquisition voxel size: square in plane, thicker slices along the third axis."""
    a = float(rng.uniform(*in_plane_mm))
    return (a, a, float(max(a, rng.uniform(*slice_mm))))


def anatomical_brain(rng: np.random.Generator, voxel_size, max_shape=(144, 144, 96),
                     elastic_mm: float = 2.0, scale_range=(0.9, 1.1), sharp: bool = False,
                     texture: bool = False) -> AnatomicalBrain:
    """A deformed MNI brain resampled to ``voxel_size``; a field of view of at most ``max_shape`` voxels,
    placed at random over the brain when the whole brain does not fit (keeping simulation cheap); ``sharp``:
    individual tissue boundaries (``sharp_tissue``), drawn by a generator spawned from ``rng``, which leaves
    ``rng``'s stream as it is, so that a seed gives the same brain sharp or not (a spawned child depends on the
    seed and the count of children, not on the stream's state: after a resumed training run the first children
    repeat those of the run before, which only repeats some boundary jitter); ``texture``: fine tissue texture
    (``tissue_texture``), drawn by a generator spawned after ``sharp``'s, the same way."""
    t = templates()
    sharp_rng = rng.spawn(1)[0] if sharp else None
    chi1, labels1, wm1 = susceptibility_1mm(rng, sharp_rng, rng.spawn(1)[0] if texture else None)
    vs = np.asarray(voxel_size, float)
    rot = random_rotation(rng, 15.0, 10.0)
    scale = rng.uniform(*scale_range, 3)
    extent = np.ptp(np.argwhere(t["mask"]), axis=0) + 1.0  # mm
    centre = np.argwhere(t["mask"]).mean(0)
    full = np.ceil(extent * scale.max() * 1.05 / vs).astype(int)
    shape = np.minimum(full, max_shape)
    offset = (rng.uniform(-0.5, 0.5, 3) * np.maximum(full - shape, 0)) * vs  # mm, where the box sits
    grids = np.meshgrid(*[(np.arange(n) - (n - 1) / 2.0) * h + o for n, h, o in zip(shape, vs, offset)],
                        indexing="ij")
    points = np.stack([g.ravel() for g in grids])  # target mm
    source = (rot.T @ points) / scale[:, None]
    if elastic_mm > 0:
        for axis in range(3):
            source[axis] += elastic_mm * smooth_noise(tuple(shape), tuple(vs), 15.0, rng).ravel()
    source += centre[:, None]
    blur = [np.sqrt(max(h**2 - 1.0, 0.0)) / 2.355 for h in vs]  # partial volume of the thicker voxel

    def resample(volume: np.ndarray, order: int = 1, smooth: bool = True) -> np.ndarray:
        v = ndimage.gaussian_filter(volume, blur) if smooth and any(blur) else volume
        return ndimage.map_coordinates(v, source, order=order, mode="constant").reshape(tuple(shape)).astype(np.float32)

    chi1 = ndimage.gaussian_filter(chi1, 0.5)  # partial volume at 1 mm
    mask = resample(t["mask"].astype(np.float32), smooth=False) > 0.5
    chi = np.where(mask, resample(chi1), 0.0).astype(np.float32)
    return AnatomicalBrain(chi, mask, resample(wm1),
                           resample(labels1.astype(np.float32), order=0, smooth=False).astype(np.uint8) * mask,
                           tuple(float(h) for h in vs))
