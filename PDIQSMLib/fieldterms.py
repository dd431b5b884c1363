"""The non-dipolar part of a real local field: what ``D chi`` of an isotropic chi leaves out.

Measured on real 3 T brains (METHOD.md, "Real fields"), about half of a local field's norm is not the
dipole field of any isotropic susceptibility map; it lies everywhere in the brain, somewhat stronger
near the edge, and is more fine-grained than smooth. Each term here is one physical source of it,
seeded, in ppm, on the acquisition grid:

- ``anisotropy_field``: white-matter susceptibility anisotropy. chi is a tensor
  ``chi_iso I + dchi (n n^T - I/3)`` with fibre direction n; its field (Lorentz-corrected,
  Liu 2010's STI model) is ``F^-1 [ H^T X H / 3 - (k.H)(k^T X H) / k^2 ]``; the isotropic part is the
  truth, the rest is the term. dchi about 0.01-0.02 ppm (Li et al. 2012; Wharton and Bowtell 2012).
- ``background_residue``: what background-field removal leaves: the harmonic field of sources just
  outside the brain (air, bone, vessels), strongest near the edge.
- ``distant_harmonics``: what removal leaves of distant sources (sinuses, ear canals, the body, the shim): a field
  harmonic across the whole brain, its low orders (linear and quadratic trends). Not in the bundled model's mix; a
  +-0.005 ppm linear trend cost it up to 3.7 points (benchmarks/results/field_offset.md, session 38).
- ``correlated_noise``: noise of the multi-echo fit and unwrapping is not white: white noise blurred
  over about a voxel (the second-difference estimate barely sees it, the cone does).
- ``perturbed_mask``: the brain mask of a real pipeline misses or overhangs the brain by a voxel or two;
  where it overhangs, the field is the tissue's field outside the brain plus the noise of low signal.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from .geometry import Geometry
from .physics import dipole_kernel, kspace_axes, padded_shape
from .phantoms import smooth_noise
from .weighting import solid_harmonics


def _rfft_padded(x: np.ndarray, pad_shape) -> torch.Tensor:
    return torch.fft.rfftn(torch.from_numpy(np.asarray(x, np.float32)), s=pad_shape)


def _crop_irfft(spectrum: torch.Tensor, pad_shape, shape) -> np.ndarray:
    return torch.fft.irfftn(spectrum, s=pad_shape)[: shape[0], : shape[1], : shape[2]].numpy()


def fibre_directions(shape, voxel_size, rng: np.random.Generator, scale_mm: float = 8.0) -> np.ndarray:
    """Unit vectors (3, X, Y, Z) that turn smoothly over ``scale_mm``: a stand-in for tract directions."""
    n = np.stack([smooth_noise(shape, voxel_size, scale_mm, rng) for _ in range(3)])
    return n / np.maximum(np.linalg.norm(n, axis=0), 1e-6)


def anisotropy_field(wm: np.ndarray, geometry: Geometry, delta_chi: float, directions: np.ndarray,
                     pad: float = 1.5) -> np.ndarray:
    """Field (ppm) of the anisotropic part ``delta_chi * wm * (n n^T - I/3)`` of a susceptibility tensor.

    ``wm`` is the white-matter fraction (0..1), ``directions`` the fibre unit vectors (3, X, Y, Z), B0 is
    ``geometry.b0_dir`` in voxel axes. An isotropic tensor would give exactly ``D chi``; this traceless
    part gives no ``D chi`` of any isotropic chi in general.
    """
    shape = wm.shape
    ps = padded_shape(shape, pad)
    h = np.asarray(geometry.b0_dir, float)
    amp = delta_chi * np.asarray(wm, np.float32)
    n_dot_h = np.tensordot(h, directions, axes=1)
    scalar = amp * (n_dot_h**2 - 1.0 / 3.0)  # H^T X H
    k = kspace_axes(ps, geometry.voxel_size, True, torch.float32)
    k2 = sum(ki**2 for ki in k)
    k2 = torch.where(k2 == 0, torch.ones_like(k2), k2)
    k_dot_h = sum(float(hi) * ki for hi, ki in zip(h, k))
    k_dot_v = 0.0
    for axis in range(3):  # (X H)_axis = amp (n_axis (n.H) - H_axis / 3)
        v = amp * (directions[axis] * n_dot_h - h[axis] / 3.0)
        k_dot_v = k_dot_v + k[axis] * _rfft_padded(v, ps)
    spectrum = _rfft_padded(scalar, ps) / 3.0 - k_dot_h * k_dot_v / k2
    spectrum[0, 0, 0] = 0.0
    return _crop_irfft(spectrum, ps, shape).astype(np.float32)


def _unit_in_mask(field: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``field`` with zero mean and unit std in ``m``, zero outside; float32."""
    field = np.where(m, field - field[m].mean(), 0.0)
    return (field / max(float(field[m].std()), 1e-12)).astype(np.float32)


def background_residue(mask: np.ndarray, geometry: Geometry, rng: np.random.Generator,
                       shell_mm: tuple[float, float] = (1.0, 15.0), sources: int = 40, pad: float = 1.5) -> np.ndarray:
    """Harmonic field (ppm, unit std in the mask) of random blobs of susceptibility in a shell outside
    ``mask``: the residue of imperfect background removal, strongest near the brain's edge."""
    m = np.asarray(mask) > 0
    vs = np.asarray(geometry.voxel_size)
    outside_mm = ndimage.distance_transform_edt(~m, sampling=vs)
    shell = np.argwhere((outside_mm >= shell_mm[0]) & (outside_mm <= shell_mm[1]))
    chi = np.zeros(m.shape, np.float32)
    if len(shell) == 0:
        return chi
    for idx in shell[rng.choice(len(shell), size=min(sources, len(shell)), replace=False)]:
        r = rng.uniform(2.0, 6.0)
        reach = np.ceil(r / vs).astype(int)
        lo, hi = np.maximum(idx - reach, 0), np.minimum(idx + reach + 1, m.shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        grids = np.ogrid[box]
        ball = sum(((g - c) * h) ** 2 for g, c, h in zip(grids, idx, vs)) <= r**2
        chi[box][ball & ~m[box]] += rng.normal()
    ps = padded_shape(m.shape, pad)
    field = _crop_irfft(_rfft_padded(chi, ps) * dipole_kernel(ps, geometry, True, torch.float32), ps, m.shape)
    return _unit_in_mask(field, m)


def distant_harmonics(mask: np.ndarray, geometry: Geometry, rng: np.random.Generator,
                      quadratic: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Field (unit std and zero mean in ``mask``, zero outside) of sources far outside the brain: a random sum of the
    solid harmonics of degree 1 (x, y, z) and 2 (xy, yz, zx, x^2 - y^2, 2 z^2 - x^2 - y^2) in mm about the mask's
    centre, every one harmonic (zero Laplacian); the quadratic ones weighted by a factor drawn from ``quadratic``
    relative to the linear ones at 100 mm from the centre (a source at distance R gives degree l about (r / R)^l)."""
    m = np.asarray(mask) > 0
    if not m.any():
        return np.zeros(m.shape, np.float32)
    grids = np.indices(m.shape, dtype=np.float64)
    centre = [g[m].mean() for g in grids]
    x, y, z = ((g - c) * h / 100.0 for g, c, h in zip(grids, centre, geometry.voxel_size))
    terms = solid_harmonics(x, y, z)
    linear, square = terms[1:4], terms[4:]
    q = rng.uniform(*quadratic)
    field = sum(rng.normal() * t for t in linear) + q * sum(rng.normal() * t for t in square)
    return _unit_in_mask(field, m)


def correlated_noise(shape, rng: np.random.Generator, width_vox: float) -> np.ndarray:
    """Gaussian noise of unit std correlated over ``width_vox`` voxels (a Gaussian blur of white noise)."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), width_vox)
    return (n / max(float(n.std()), 1e-12)).astype(np.float32)


def perturbed_mask(mask: np.ndarray, voxel_size, rng: np.random.Generator, max_voxels: float = 2.0) -> np.ndarray:
    """``mask`` with its edge moved in or out by up to about ``max_voxels``, varying smoothly along it."""
    m = np.asarray(mask) > 0
    signed = ndimage.distance_transform_edt(m) - ndimage.distance_transform_edt(~m)  # voxels, > 0 inside
    shift = max_voxels * np.clip(smooth_noise(m.shape, voxel_size, 12.0, rng), -1.5, 1.5) / 1.5
    return signed + shift > 0.5
