"""What the network reads and what its outputs mean: input channels (the field, its Tikhonov inverse)
and the conversion of its scaled outputs to ppm. Used alike by training, inference and PDI-VI.

The prior channel: the network sees, beside the field, a closed-form Tikhonov inverse of it, which
carries what the field alone hides from a convolutional network (B0 direction, voxel size). Kinds:
- ``tikhonov``: lambda fixed at 5e-3 (the first bundled models; too weak for real fields, issue 12);
- ``tikhonov-auto``: lambda from the field's own effective noise (``solvers.auto_lambda``, the cone
  estimate of fieldstats.py), so that a real field, whose non-dipolar part is several times the white
  noise, gets the regularisation its noise asks for.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .network import CHI_SCALE, FIELD_SCALE, PRIORS


def to_input(field_ppm: torch.Tensor, prior_ppm: torch.Tensor | None = None) -> torch.Tensor:
    """The network's input (B, C, ...): the scaled field, then the scaled prior channel if given."""
    x = field_ppm * FIELD_SCALE
    return x if prior_ppm is None else torch.cat([x, prior_ppm * CHI_SCALE], dim=1)


def stacked_input(x_ppm: torch.Tensor) -> torch.Tensor:
    """``to_input`` for a (B, C, ...) tensor holding the field and, when C = 2, the prior (both ppm)."""
    return to_input(x_ppm[:, :1], x_ppm[:, 1:] if x_ppm.shape[1] > 1 else None)


def prior_lambda(kind: str, field_ppm: np.ndarray, mask: np.ndarray, geometry) -> float:
    """The Tikhonov weight of prior channel ``kind`` for this field."""
    from . import solvers
    from .fieldstats import cone_noise

    if kind == "tikhonov":
        return solvers.TIKHONOV_LAMBDA
    return solvers.auto_lambda("tikhonov", cone_noise(field_ppm, mask, geometry))


def prior_map(field_ppm: np.ndarray, mask: np.ndarray, geometry, kind: str,
              weight: np.ndarray | None = None) -> np.ndarray | None:
    """The prior input channel (ppm) for a network whose architecture asks for ``kind``; None for 'none'.

    With a data weight W (from a noise map) that is not uniform, the Tikhonov solution weighs the
    field by W (``solvers.tikhonov_weighted``), so that a region of very noisy field (a hemorrhage)
    does not ruin the prior, and the noise level is read from W b; with W uniform it is the closed form
    the network was trained with.
    """
    if kind == "none":
        return None
    if kind not in PRIORS:
        raise ValueError(f"unknown prior input {kind!r}; expected one of {', '.join(PRIORS)}")
    from .solvers import tikhonov, tikhonov_weighted

    m = np.asarray(mask) > 0
    b = np.where(m, field_ppm, 0.0).astype(np.float32)
    mt = torch.from_numpy(m.astype(np.float32))
    if weight is not None and np.ptp(np.asarray(weight)[m]) > 1e-3 * np.abs(np.asarray(weight)[m]).max():
        w = np.asarray(weight, np.float32)
        lam = prior_lambda(kind, w * b, m, geometry)
        chi = tikhonov_weighted(torch.from_numpy(b), mt, geometry, torch.from_numpy(w), lam)
    else:
        chi = tikhonov(torch.from_numpy(b), mt, geometry, prior_lambda(kind, b, m, geometry))
    return chi.numpy().astype(np.float32)


# A voxel whose data weight W is below this fraction of the mask's median W (its noise more than 10 times
# the typical) carries no usable field: see network_inputs.
UNRELIABLE_WEIGHT = 0.1


def unreliable_voxels(mask: np.ndarray, weight: np.ndarray | None) -> np.ndarray:
    """Mask voxels whose field is noise rather than data by the noise map (W < UNRELIABLE_WEIGHT x median W)."""
    m = np.asarray(mask) > 0
    if weight is None or not m.any():
        return np.zeros(m.shape, bool)
    w = np.asarray(weight)
    return m & (w < UNRELIABLE_WEIGHT * float(np.median(w[m])))


def network_inputs(prior: str, field: np.ndarray, mask: np.ndarray, geometry=None,
                   weight: np.ndarray | None = None) -> np.ndarray:
    """(C, X, Y, Z) ppm arrays a network with prior channel ``prior`` (its config.prior) reads: the
    masked field, and the prior computed on the whole volume (which needs the ``geometry``; ``weight``
    is W).

    Where a noise map marks the field as unreliable (``unreliable_voxels``: a hemorrhage, where the
    signal is gone and the noise map is hundreds of times the brain's), the field channel holds the field
    of the weighted Tikhonov prior instead, ``D chi_prior``: the field the reliable data predict there. The
    network never saw noise of that size in training; fed it, the bundled model turned the shared ICH
    case's bleed into 2.9 ppm (truth 1.3) with streaks across the brain (RMSE 291 %); with the fill, 59.8 %.
    ``refilled`` predicts that field from another map instead (the network's own first map: ``REFILLS``).
    """
    m = np.asarray(mask) > 0
    channels = [np.where(m, field, 0.0).astype(np.float32)]
    if prior != "none":
        if geometry is None:
            raise ValueError(f"this network reads a {prior} prior channel: the geometry is required")
        channels.append(prior_map(field, m, geometry, prior, weight))
        bad = unreliable_voxels(m, weight)
        if bad.any():
            channels[0] = _filled(channels[0], bad, channels[1], geometry)
    return np.stack(channels)


def refilled(inputs: np.ndarray, mask: np.ndarray, geometry, weight: np.ndarray | None, chi: np.ndarray) -> np.ndarray:
    """``network_inputs``' channels (not changed) with the unreliable voxels' field predicted by ``chi`` (ppm, e.g. the
    network's own first map: ``REFILLS``) instead of by the prior; the prior channel, and every other voxel, as they
    were (so a refill does not solve the weighted Tikhonov prior again)."""
    m = np.asarray(mask) > 0
    out = inputs.copy()
    out[0] = _filled(inputs[0], unreliable_voxels(m, weight), np.where(m, chi, 0.0).astype(np.float32), geometry)
    return out


def _filled(field: np.ndarray, bad: np.ndarray, chi: np.ndarray, geometry) -> np.ndarray:
    """``field`` with the ``bad`` voxels' value replaced by the forward field of ``chi`` (ppm)."""
    from .physics import simulate_field

    predicted = simulate_field(torch.from_numpy(chi), geometry, 1.5).numpy()
    return np.where(bad, predicted, field).astype(np.float32)


# PDI given a noise map that marks voxels unreliable runs REFILLS more times, each with the field there predicted by
# the previous map: the network's map, which reads the bleed's dipole field around the marked region, predicts the
# missing field better than the weighted Tikhonov prior, which shrinks a bleed. Chosen on the calibration bleed brains
# 81000-81005 with their noise maps (benchmarks/results/refill_calibration.md): one refill 0.8 points better on
# average (on 5 of 6), a second 0.1 more. With regions read off the field (no noise map) it gained nothing (+0.0),
# so it is not done there.
REFILLS = 1


# Far out of distribution (a hemorrhage) the log variance can run away; outputs are kept within
# these std bounds (ppm) by smooth limits, so that gradients still flow during fine-tuning.
MIN_STD_PPM, MAX_STD_PPM = 1e-4, 2.0


def clamp_logvar(logvar: torch.Tensor) -> torch.Tensor:
    """Log variance (network units) softly limited to MIN_STD_PPM <= std <= MAX_STD_PPM (identity inside)."""
    lo = 2.0 * math.log(MIN_STD_PPM * CHI_SCALE)
    hi = 2.0 * math.log(MAX_STD_PPM * CHI_SCALE)
    softplus = torch.nn.functional.softplus
    return lo + softplus(hi - softplus(hi - logvar) - lo)


def from_output(mean: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean ppm, std ppm) from the network's scaled outputs."""
    return mean / CHI_SCALE, torch.exp(0.5 * clamp_logvar(logvar)) / CHI_SCALE
