"""Statistics that tell a real local field from a simulated one, and its noise level read from the data.

A field made only by susceptibility, ``b = F^-1 D F chi``, has almost no power where the dipole
kernel vanishes (the magic-angle cone, ``|D(k)| < 0.1``); white noise and every non-dipolar part of a
real field (fibre anisotropy, background residue, correlated noise, mask errors) spread their power
evenly over k-space, so they put the cone's volume share there. The share of a field's power in the
cone therefore measures how much of it no susceptibility map can explain, without any reference
(METHOD.md, "Real fields"). The same reading is used for simulated and real fields, always the same
way: brain-masked, demeaned in the mask, no padding, k inside the sphere of the coarsest axis's
Nyquist frequency, k = 0 left out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .geometry import Geometry
from .physics import dipole_kernel, kspace_axes

CONE_THRESHOLD = 0.1  # |D(k)| below this is "the cone"


@dataclass(frozen=True)
class FieldStats:
    """What ``field_stats`` reads off a field (ppm)."""

    std_ppm: float  # standard deviation of the demeaned field in the mask
    cone_share: float  # share of the power inside the cone (0..1)
    cone_volume_share: float  # the cone's share of the k-space sphere (white noise's cone share)
    white_noise_ppm: float  # white noise by (1, -2, 1)^3 second differences
    cone_noise_ppm: float  # effective noise: std * sqrt(cone share / cone volume share)

    def as_dict(self) -> dict:
        return {k: round(v, 6) for k, v in asdict(self).items()}


def _kspace_sphere(shape, geometry: Geometry) -> torch.Tensor:
    """Boolean half-k-space grid: inside the sphere of the coarsest axis's Nyquist frequency, k != 0."""
    axes = kspace_axes(tuple(shape), geometry.voxel_size, True, torch.float64)
    k2 = sum(k**2 for k in axes)
    k_max = 0.5 / max(geometry.voxel_size)
    return (k2 <= k_max**2) & (k2 > 0)


def _half_weights(shape) -> torch.Tensor:
    """Multiplicity of each rfft sample in the full spectrum (2 but for the k_z = 0 and Nyquist planes)."""
    nz = shape[2] // 2 + 1
    w = torch.full((nz,), 2.0, dtype=torch.float64)
    w[0] = 1.0
    if shape[2] % 2 == 0:
        w[-1] = 1.0
    return w.reshape(1, 1, -1)


def _sphere_and_cone(shape, geometry: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """(``_kspace_sphere``, the magic-angle cone |D(k)| < CONE_THRESHOLD) on the half-k-space grid."""
    return _kspace_sphere(shape, geometry), dipole_kernel(shape, geometry, True, torch.float64).abs() < CONE_THRESHOLD


def cone_share(field: np.ndarray, mask: np.ndarray, geometry: Geometry) -> tuple[float, float]:
    """(share of the masked, demeaned field's power in the cone, the cone's share of the k-space sphere)."""
    m = np.asarray(mask) > 0
    f = np.where(m, np.asarray(field, np.float64) - float(np.asarray(field, np.float64)[m].mean()), 0.0)
    power = torch.fft.rfftn(torch.from_numpy(f)).abs() ** 2
    inside, cone = _sphere_and_cone(f.shape, geometry)
    w = _half_weights(f.shape).expand_as(power)
    total = float((power * w)[inside].sum())
    share = float((power * w)[inside & cone].sum()) / max(total, 1e-300)
    volume = float(w[inside & cone].sum() / w[inside].sum())
    return share, volume


def second_difference_responses(field: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """|(1, -2, 1)^3 second difference| of ``field`` at the voxels of ``mask`` whose whole 3x3x3
    neighbourhood is in it (1-D). White noise of std s gives responses of std sqrt(6^3) s; a smooth tissue
    field is cancelled wherever it is locally polynomial of degree < 2 along any one axis."""
    c, inner = field, mask > 0
    for d in range(3):
        c = torch.roll(c, 1, d) - 2.0 * c + torch.roll(c, -1, d)
        inner = inner & torch.roll(inner, 1, d) & torch.roll(inner, -1, d)
    return c[inner].abs()


def second_difference_noise(field: np.ndarray, mask: np.ndarray) -> float:
    """White-noise std (ppm): the median absolute second-difference response (robust to the voxels near
    sources), scaled by 1.4826 / sqrt(216)."""
    r = second_difference_responses(torch.from_numpy(np.asarray(field, np.float64)), torch.from_numpy(np.asarray(mask) > 0))
    return float(1.4826 * r.median() / math.sqrt(216.0)) if r.numel() else float("nan")


MIN_VOXELS = 27  # a mask smaller than one 3x3x3 block has no field statistics


class NoStatistics(ValueError):
    """A field whose statistics cannot be read; ``role`` names the input at fault ('mask' or 'field')."""

    def __init__(self, role: str, problem: str) -> None:
        super().__init__(problem)
        self.role = role


def _too_small(m: np.ndarray) -> str | None:
    n = int(m.sum())
    return (f"the mask holds {n} voxel{'' if n == 1 else 's'}, fewer than {MIN_VOXELS}: no field statistics"
            if n < MIN_VOXELS else None)


def _no_cone(shape) -> str:
    return (f"a grid of {' x '.join(str(n) for n in shape)} voxels has no k-space sample in the magic-angle cone "
            f"(|D| < {CONE_THRESHOLD}), so the field's noise level cannot be read off it: too few slices for a 3-D "
            "dipole inversion")


def noise_problem(field: np.ndarray, mask: np.ndarray, geometry: Geometry) -> tuple[str, str] | None:
    """Why the field's own noise level (``cone_noise``) cannot be read, as (the input at fault, 'mask' or 'field';
    the problem), or None: a mask under MIN_VOXELS voxels, a grid so thin along some axis that no k-space sample
    inside the sphere lies in the cone, or a field constant inside the mask (nothing in it to explain)."""
    m = np.asarray(mask) > 0
    if (small := _too_small(m)) is not None:
        return "mask", small
    inside, cone = _sphere_and_cone(m.shape, geometry)
    if not bool((inside & cone).any()):
        return "field", _no_cone(m.shape)
    if float(np.asarray(field, np.float64)[m].std()) == 0.0:
        return "field", "the field is constant inside the mask: there is nothing to invert and no noise level to read"
    return None


def field_stats(field: np.ndarray, mask: np.ndarray, geometry: Geometry) -> FieldStats:
    """The real-field statistics of ``field`` (ppm) inside ``mask``; NoStatistics for a mask under MIN_VOXELS
    voxels or a grid without a cone (``noise_problem``)."""
    m = np.asarray(mask) > 0
    if (small := _too_small(m)) is not None:
        raise NoStatistics("mask", small)
    std = float(np.asarray(field, np.float64)[m].std())
    share, volume = cone_share(field, m, geometry)
    if volume == 0.0:
        raise NoStatistics("field", _no_cone(m.shape))
    return FieldStats(std, share, volume, second_difference_noise(field, m), std * math.sqrt(share / volume))


def cone_noise(field: np.ndarray, mask: np.ndarray, geometry: Geometry) -> float:
    """The effective noise level (ppm) of a field: the part no susceptibility map can explain, read off
    the cone (``field_stats``'s ``cone_noise_ppm``)."""
    return field_stats(field, mask, geometry).cone_noise_ppm
