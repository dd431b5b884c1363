"""MAP baselines for the dipole inversion: TKD, closed-form Tikhonov, and MEDI (weighted TV, by ADMM).

Each takes a local field (ppm, torch tensor X x Y x Z), a mask, and a Geometry, and returns the
susceptibility (ppm) on the same grid, zero outside the mask.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .defaults import MEDI_LAMBDA, MEDI_MAX_ITER, TIKHONOV_LAMBDA, TKD_THRESHOLD  # noqa: F401  (re-exported)
from .geometry import Geometry
from .gradient import grad, grad_adjoint
from .memory import reuse_freed_memory
from .physics import DipoleOperator, gradient_kernels

ProgressFn = Callable[[int, int], None]

# Closed-form methods treat the whole FOV as data (the field is zero outside the mask), so periodic
# wrap-around hurts them: 1.5x padding cut Tikhonov's RMSE from 48.7 % to 36.0 % on a noiseless
# simulated brain. MEDI weights the data by the mask and needs none.
CLOSED_FORM_PAD = 1.5
# The fixed lambdas (defaults.py) were the best on the first, clean simulator (benchmarks/lambda_sweep.py);
# real fields need 10-60 times more, which is what the automatic choice below gives them.

# lambda from the field's own noise: both priors read as Gaussian / Laplace densities give
# lambda = (noise variance) / (prior scale), so lambda = c s^2 with s the effective noise (the cone
# estimate, fieldstats.cone_noise). c is fitted to the best fixed lambda on realistic simulated brains
# (benchmarks/auto_lambda.py --fit; its table shows how close the rule comes to the best fixed lambda).
AUTO_LAMBDA_PER_NOISE2 = {"tikhonov": 3.0e3, "medi": 50.0, "medi-pdi-edges": 400.0}
# MEDI with its edge mask from PDI's map (``--medi-edges pdi``): M spares that map's 0.7 N strongest gradient
# components (N mask voxels; MEDI's magnitude rule, weighting.gradient_mask, spares 0.9 N), and the TV weight is 8x
# plain MEDI's. Chosen on the four sigma-calibration brains (20000-20003; grid 0.5 / 0.7 x 1, 2, 4, 8 times plain
# MEDI's lambda): demeaned NRMSE 57.6 % against PDI 60.5 and plain MEDI 71.0; on the held-out brains 31000-31002:
# 51.4 against 53.0 and 52.6.
PDI_EDGE_FRACTION = 0.7
AUTO_LAMBDA_RANGE = (1e-4, 1.0)


def auto_lambda(method: str, noise_ppm: float) -> float:
    """The regularisation weight of ``method`` ('tikhonov', 'medi' or 'medi-pdi-edges') for a field of effective noise
    ``noise_ppm`` (ppm), kept within AUTO_LAMBDA_RANGE."""
    if not noise_ppm > 0:
        raise ValueError(f"the noise level must be > 0 ppm, got {noise_ppm}")
    lo, hi = AUTO_LAMBDA_RANGE
    return float(min(max(AUTO_LAMBDA_PER_NOISE2[method] * noise_ppm**2, lo), hi))


MEDI_TOL = 1e-3


def _masked(chi: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return chi * (mask > 0).to(chi.dtype)


def tkd(field: torch.Tensor, mask: torch.Tensor, geometry: Geometry, threshold: float = TKD_THRESHOLD,
        pad: float = CLOSED_FORM_PAD, correct_bias: bool = False) -> torch.Tensor:
    """Truncated k-space division: 1/D where |D| > t, sign(D)/t elsewhere (D(0) -> 0).

    ``correct_bias`` divides by the mean over k-space of the filter's transfer D * D_t^-1, the
    underestimation that truncation causes (the correction of Schweser et al., MRM 2013).
    """
    if not 0 < threshold < 2.0 / 3.0:
        raise ValueError(f"TKD threshold must be in (0, 2/3), got {threshold}")
    op = DipoleOperator(field.shape, geometry, pad, field.dtype, field.device)
    d = op.kernel
    inv = torch.where(d.abs() > threshold, 1.0 / torch.where(d == 0, torch.ones_like(d), d), torch.sign(d) / threshold)
    spectrum = torch.fft.rfftn(op.pad(field * (mask > 0)), dim=(-3, -2, -1)) * inv
    chi = op.crop(torch.fft.irfftn(spectrum, s=op.pad_shape, dim=(-3, -2, -1)))
    if correct_bias:
        chi = chi / _mean_transfer(d * inv, op.pad_shape[-1])
    return _masked(chi, mask)


def _mean_transfer(h_half: torch.Tensor, nz: int) -> float:
    """Mean over the full k-space of a real even function given on the rfft half grid."""
    weights = torch.full((h_half.shape[-1],), 2.0, dtype=h_half.dtype, device=h_half.device)
    weights[0] = 1.0
    if nz % 2 == 0:
        weights[-1] = 1.0
    return float((h_half * weights).sum() / (h_half.shape[0] * h_half.shape[1] * nz))


def _laplacian_symbol(shape, geometry: Geometry, dtype, device) -> torch.Tensor:
    """Sum over axes of |E_i|^2, the symbol of grad^T grad."""
    return sum(e.abs() ** 2 for e in gradient_kernels(shape, geometry, True, torch.complex128, device)).to(dtype)


def tikhonov(field: torch.Tensor, mask: torch.Tensor, geometry: Geometry, lam: float = TIKHONOV_LAMBDA,
             pad: float = CLOSED_FORM_PAD) -> torch.Tensor:
    """Closed form of argmin ||D chi - b||^2 + lam ||grad chi||^2 (gradient in ppm/mm)."""
    if lam <= 0:
        raise ValueError(f"Tikhonov lambda must be > 0, got {lam}")
    op = DipoleOperator(field.shape, geometry, pad, field.dtype, field.device)
    d = op.kernel
    lap = _laplacian_symbol(op.pad_shape, geometry, field.dtype, field.device)
    denom = d**2 + lam * lap
    denom = torch.where(denom == 0, torch.ones_like(denom), denom)
    spectrum = torch.fft.rfftn(op.pad(field * (mask > 0)), dim=(-3, -2, -1)) * (d / denom)
    return _masked(op.crop(torch.fft.irfftn(spectrum, s=op.pad_shape, dim=(-3, -2, -1))), mask)


def tikhonov_weighted(field: torch.Tensor, mask: torch.Tensor, geometry: Geometry, weight: torch.Tensor,
                      lam: float = TIKHONOV_LAMBDA, pad: float = CLOSED_FORM_PAD, max_iter: int = 15,
                      tol: float = 1e-3) -> torch.Tensor:
    """argmin ||V (D chi - b)||^2 + lam ||grad chi||^2 with V = W inside the mask and 1 outside it.

    Outside the mask (and in the padding) the field counts as a measured zero, exactly as in the
    closed form, which this equals when W = 1; inside, voxels with a noisy field (small W) count
    less. Solved by conjugate gradients preconditioned with the closed form's k-space inverse, from
    the closed-form solution, until the residual falls by ``tol`` (on the ICH case the RMSE settles
    within 10 iterations: 55.9 % after 10, 56.4 % after 50, against 345 % for the closed form).
    """
    if lam <= 0:
        raise ValueError(f"Tikhonov lambda must be > 0, got {lam}")
    dtype = torch.float32
    inside = (mask > 0).to(dtype)
    op = DipoleOperator(field.shape, geometry, pad, dtype, field.device)
    v2 = op.pad(torch.where(inside > 0, weight.to(dtype), torch.ones_like(inside)) ** 2)
    v2 = v2 + (1.0 - op.pad(torch.ones_like(inside)))  # the padding: weight 1
    b = op.pad(field.to(dtype) * inside)
    d = op.kernel
    lap = _laplacian_symbol(op.pad_shape, geometry, dtype, field.device)
    denom = d**2 + lam * lap
    gain = torch.where(denom == 0, torch.zeros_like(denom), 1.0 / torch.where(denom == 0, torch.ones_like(denom), denom))
    rfft = lambda x: torch.fft.rfftn(x, dim=(-3, -2, -1))  # noqa: E731
    irfft = lambda x: torch.fft.irfftn(x, s=op.pad_shape, dim=(-3, -2, -1))  # noqa: E731
    dconv = lambda x: irfft(rfft(x) * d)  # noqa: E731
    apply = lambda x: dconv(v2 * dconv(x)) + lam * irfft(rfft(x) * lap)  # noqa: E731
    precondition = lambda r: irfft(rfft(r) * gain)  # noqa: E731
    rhs = dconv(v2 * b)
    x = irfft(rfft(b) * d * gain)  # the closed form (W = 1)
    r = rhs - apply(x)
    z = precondition(r)
    p = z.clone()
    rz = float((r * z).sum())
    r0 = float(r.norm())
    for _ in range(max_iter):
        if float(r.norm()) <= tol * max(r0, float(rhs.norm()) * 1e-12):
            break
        ap = apply(p)
        alpha = rz / float((p * ap).sum())
        x = x + alpha * p
        r = r - alpha * ap
        z = precondition(r)
        rz_new = float((r * z).sum())
        p = z + (rz_new / rz) * p
        rz = rz_new
    return _masked(op.crop(x).to(field.dtype), mask)


def tikhonov_lcurve(field: torch.Tensor, mask: torch.Tensor, geometry: Geometry,
                    lambdas=np.logspace(-5, 0, 26), pad: float = CLOSED_FORM_PAD) -> float:
    """Lambda at the L-curve's corner (largest curvature of log residual vs log gradient norm).

    Both norms are evaluated in k-space (Parseval), so the whole curve costs one FFT. Kept for comparison
    only: on dipole inversion the curve has no reliable corner (on a procedural brain, 1e-3 and 1e-2 ppm
    noise gave corners at 4e-5 and 1.6e-5, moving the wrong way); the default is ``auto_lambda``.
    """
    op = DipoleOperator(field.shape, geometry, pad, torch.float64, field.device)
    d = op.kernel
    lap = _laplacian_symbol(op.pad_shape, geometry, torch.float64, field.device)
    b = torch.fft.rfftn(op.pad((field * (mask > 0)).double()), dim=(-3, -2, -1))
    b2 = b.abs() ** 2
    res, reg = [], []
    for lam in lambdas:
        denom = d**2 + lam * lap
        denom = torch.where(denom == 0, torch.ones_like(denom), denom)
        x2 = b2 * (d / denom) ** 2
        res.append(float((b2 * (lam * lap / denom) ** 2).sum()))
        reg.append(float((lap * x2).sum()))
    x, y = np.log(res), np.log(reg)
    t = np.log(lambdas)
    dx, dy = np.gradient(x, t), np.gradient(y, t)
    ddx, ddy = np.gradient(dx, t), np.gradient(dy, t)
    curvature = (dx * ddy - ddx * dy) / np.maximum((dx**2 + dy**2) ** 1.5, 1e-30)
    return float(lambdas[int(np.argmax(curvature[1:-1])) + 1])


def _soft_threshold(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.clamp(x.abs() - t, min=0.0)


@reuse_freed_memory()
def medi(field: torch.Tensor, mask: torch.Tensor, geometry: Geometry, lam: float = MEDI_LAMBDA,
         weight: torch.Tensor | None = None, edge_mask: torch.Tensor | None = None, pad: float = 1.0,
         max_iter: int = MEDI_MAX_ITER, tol: float = MEDI_TOL, progress: ProgressFn | None = None,
         mu_data: float = 0.1, mu_tv: float | None = None, info: dict | None = None) -> torch.Tensor:
    """argmin ||W (D chi - b)||^2 + lam ||M grad chi||_1, by ADMM with two splittings.

    v = D chi carries the weighted data term and z = grad chi the TV term; both sub-problems are then
    element-wise and the chi update is one division in k-space (D and the periodic gradient share the
    FFT's eigenbasis). Iterates until the relative change of chi inside the mask falls below ``tol``.
    ``weight`` is W (default: the mask), ``edge_mask`` is M with shape (3, X, Y, Z) (default: the mask).
    ``info``, when given, receives ``iterations``, ``converged`` and the last ``relative_change``.
    """
    if lam < 0:
        raise ValueError(f"MEDI lambda must be >= 0, got {lam}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    dtype, device = field.dtype, field.device
    inside = (mask > 0).to(dtype)
    op = DipoleOperator(field.shape, geometry, pad, dtype, device)
    w2 = op.pad(inside if weight is None else weight.to(dtype) * inside) ** 2
    m = op.pad(inside.expand(3, *inside.shape) if edge_mask is None else edge_mask.to(dtype) * inside)
    b = op.pad(field.to(dtype) * inside)
    vs = geometry.voxel_size
    d = op.kernel
    lap = _laplacian_symbol(op.pad_shape, geometry, dtype, device)
    # ADMM penalties: mu1 for v = D chi, mu2 for z = grad chi (by default scaled with lam, as in FANSI).
    mu1 = mu_data
    mu2 = mu_tv if mu_tv is not None else max(100.0 * lam, 1e-6)
    denom = mu1 * d**2 + mu2 * lap
    denom = torch.where(denom == 0, torch.ones_like(denom), denom)
    data_gain, tv_gain = mu1 * d / denom, mu2 / denom  # chi_hat = data_gain F(v - u1) + tv_gain F(grad^T (z - u2))
    data_gain[0, 0, 0] = 0.0  # the mean of chi over the grid is not determined by the data: fix it at 0
    tv_gain[0, 0, 0] = 0.0
    rfft = lambda x: torch.fft.rfftn(x, dim=(-3, -2, -1))  # noqa: E731
    irfft = lambda x: torch.fft.irfftn(x, s=op.pad_shape, dim=(-3, -2, -1))  # noqa: E731

    chi = torch.zeros_like(b)
    v = b.clone()
    u1 = torch.zeros_like(b)
    z = torch.zeros((3,) + b.shape, dtype=dtype, device=device)
    u2 = torch.zeros_like(z)
    thresh = lam * m / mu2
    v_num, v_den = 2.0 * w2 * b, 1.0 / (2.0 * w2 + mu1)
    crop_mask = op.pad(inside)
    for it in range(1, max_iter + 1):
        chi_hat = data_gain * rfft(v - u1) + tv_gain * rfft(grad_adjoint(z - u2, vs))
        new_chi = irfft(chi_hat)
        d_chi = irfft(chi_hat * d)
        g_chi = grad(new_chi, vs)
        v = (v_num + mu1 * (d_chi + u1)) * v_den
        zu = g_chi + u2
        z = zu - torch.clamp(zu, min=-thresh, max=thresh)  # soft threshold
        u1 += d_chi - v
        u2 = zu - z
        change = float(((new_chi - chi) * crop_mask).norm() / (new_chi * crop_mask).norm().clamp_min(1e-12))
        chi = new_chi
        converged = change < tol
        if progress is not None:
            progress(it, it if converged else max_iter)  # converged: report the loop complete
        if converged:
            break
    if info is not None:
        info.update(iterations=it, converged=converged, relative_change=change, tolerance=tol)
    return _masked(op.crop(chi), mask)
