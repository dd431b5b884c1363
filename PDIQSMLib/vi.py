"""Unsupervised variational fine-tuning of PDI (Eqs. 11 and 12): PDI-VI1 (TV prior) and PDI-VI2 (flat prior).

For fields b without labels, minimise over the network weights

    KL = -1/2 sum log sigma^2
         + 1/(2 s^2) [ (1/K) sum_k ||P W (D chi_k - b)||^2 + lambda (1/K) sum_k ||M grad chi_k||_1 ]

with chi_k = mu + sigma eps_k (reparameterisation), K samples per iteration. W is MEDI's data weight
(mean 1 in the mask) and s the field noise level (ppm) where W = 1, so W/s is the paper's Sigma_b^-1/2; P is the
identity, as in the paper, unless asked (``--vi-harmonics ignore``, ``harmonic_nuisance``) to project off the span of
W h, h the solid harmonics up to degree 2 in the mask: what sources outside the brain could make;
lambda has the meaning it has in ``solvers.medi`` (default ``defaults.VI_LAMBDA``, 3x MEDI's 1e-3; the pipeline
gives 1e-2, ``defaults.VI_LAMBDA_PDI_EDGES``, when M comes from PDI's map: ``pipeline.vi_volume``).
Without a given s, it is estimated from the field itself (``estimate_noise_level``): the white noise
(second differences) while the mean is tuned, and the cone estimate, which reads the non-dipolar part
of real fields too, for the sigma reported (see ``estimate_noise_level`` for why the two). Fine-tuning
stops when the mean map moved less than ``tol`` over 10 iterations (or at ``iterations``; where the map is
kept only in part, ``VolumeData.keep``, the map returned is measured); the per-voxel variances are then set
for the mean reached at the cone's s (``settle_variances``, no network pass).

What sigma to expect: with a flat prior the mean-field optimum per voxel is exactly
sigma_j = s / sqrt(P_j), P_j = sum_i W_i^2 d_ij^2 (``fidelity_diagonal``), whatever the mean: about
3.4 s / W where the dipole kernel's energy stays in weighted voxels, and large where the field is
unmeasured around a voxel (ICH: median 4.2e-3 ppm in the brain, 0.05 ppm in the bleed and its noisy
halo). The TV term on the samples adds about lambda c sigma / (2 s^2) per voxel (c ~ 3.4) and pulls sigma
towards 2 s^2 / (lambda c); so the sigma reported is settled without it (``settle_variances``,
``sigma_tv``), at the flat prior's optimum for the mean reached. This is the mean-field sigma: the spread
of chi_j given its neighbours, not its marginal spread, so it is smaller than the error wherever the
error is bias (measured on ICH with the first model: 2-sigma coverage 40-52 %, benchmarks/results/vi_cpu.md).

Where sigma comes from (``VIConfig.variance``):
- 'voxel' (default): the log-variance decoder is frozen; its output is the start of one free log
  variance per voxel (the classical mean-field parameters, Adam step ``voxel_lr``), so each voxel
  can reach its own optimum. Adapted weights written for a set keep the base network's sigma.
- 'network': the decoder is tuned, as in the paper. Measured, it cannot fit the optimum's pattern:
  the KL's cost is quadratic in sigma above the optimum and only logarithmic below, so shared weights
  push every voxel down to cut the worst; on the ICH case sigma falls to the lower bound (1e-4 ppm)
  in the bleed and to 1e-3 in the brain (2-sigma coverage 3 %), with either estimator.

How the expectation over q is taken (``VIConfig.estimator``): 'exact' (default), in closed form
(``expected_kl``), the K -> infinity loss without sampling noise; 'mc', K reparameterised samples (the
paper's). On a whole brain both cost the same per iteration (the network's passes are nearly all of it).

Variants trade speed for flexibility: 'full' tunes every weight; 'decoders' freezes the encoder and
caches its features; 'last' also caches everything before each decoder's last level, tuning only
those levels. Batch norm keeps its trained statistics throughout (eval mode). The default is
'decoders', per volume and on a set. Per volume, at the other defaults (27171-step model; details in
benchmarks/results/vi_trace_cpu.md, "Session 12"), it is as accurate as 'full' on six realistic brains
(demeaned NRMSE 58.6 against 58.4 %), better on the ICH case (PDI-VI1 51.2 % and bleed 0.771 ppm against
54.3 % and 0.717; truth 1.335), and 0.64-0.91x the time per whole-brain iteration (three runs of
benchmarks/bench_vi_speed.py; 0.67-0.73x end to end on the ICH case and two realistic brains). 'full' was
the default when the model was trained on procedural brains with a flat prior and uniform noise, where it
moved the bleed furthest (1.217 -> 1.27 ppm in 200 iterations against 1.235 with 'decoders'). On a set, a
frozen encoder also keeps the base network's calibrated sigma, see ``pipeline.set_sigma``.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from .defaults import PRECISIONS, VI_ITERATIONS, VI_LAMBDA
from .errors import InputError
from .geometry import Geometry
from .gradient import grad
from .inference import mask_box, pad_to_stride, paste, run_network
from .memory import reuse_freed_memory
from .network import CHI_SCALE, PDINet, use_bf16
from .network_io import clamp_logvar, network_inputs, stacked_input
from .physics import DipoleOperator
from .schedules import cosine

VARIANTS = ("full", "decoders", "last")
ESTIMATORS = ("mc", "exact")  # the KL's expectation over q: K Monte Carlo samples, or in closed form
VARIANCES = ("network", "voxel")  # sigma from the log-variance decoder, or per voxel (refined from it)
NOISE_ESTIMATES = ("cone", "white")  # s from the field: what no map explains, or the white noise alone
# Why this default: the module's docstring (and pipeline.set_sigma on a set: a frozen encoder keeps the
# base network's sigma, since the frozen log-variance decoder reads the encoder).
DEFAULT_VARIANT = "decoders"


@dataclass
class VIConfig:
    lam: float = VI_LAMBDA  # 0 gives PDI-VI2
    samples: int = 5
    iterations: int = VI_ITERATIONS
    lr: float = 1e-3
    variant: str = DEFAULT_VARIANT
    noise_level: float | None = None  # ppm where W = 1, for tuning and sigma; None: estimated from the field
    noise_estimate: str = "white"  # s while the mean is tuned: 'white' (second differences) or 'cone'
    sigma_estimate: str = "cone"  # s the voxel sigma is settled for afterwards: 'cone' (all no map explains) or 'white'
    warmup: int = 0  # > 0: Adam's step on the network rises linearly to lr over this many iterations
    lr_final: float | None = None  # a number: Adam's step falls from lr to it over the iterations (cosine)
    tv_start: float = 1.0  # the TV weight starts at tv_start * lam and falls geometrically to lam over tv_iterations
    tv_iterations: int = 0
    # stop when the mean map (where it is kept only in part, VolumeData.keep: the map returned) moved less than this
    # (relative L2 in the mask) over 10 iterations
    tol: float = 0.01
    variance_iterations: int = 100  # with sigma_tv, Adam steps on the voxel variances alone, for the mean reached
    seed: int = 0
    pad: float = 1.0
    estimator: str = "exact"  # the KL's expectation in closed form; "mc": K = samples draws (the paper's)
    variance: str = "voxel"
    voxel_lr: float = 0.1  # Adam step for the per-voxel log variances ('voxel')
    sigma_tv: bool = False  # settle the voxel variances with the TV term too (False: the field's own spread)
    # The network's passes: 'fp32', 'bf16' (autocast) or 'auto': on a GPU bf16 where supported; on a CPU with bf16
    # arithmetic, whichever of the two ran its timed iteration faster (``PrecisionTrial``), else fp32. Which is
    # faster depends on the CPU: a whole-brain iteration, decoders tuned, took 5.74 s in bf16 against 3.63 in fp32
    # on a 2-core Xeon with AVX512-BF16 and no AMX (benchmarks/results/vi_speed_cpu.md), 2.83 against 4.74 on a
    # 2-core AMD EPYC with AVX512-BF16 (vi_speed_cpu_epyc.md); as accurate (ICH case 54.0 against 54.3 %, brain
    # 20002 57.8 / 57.9).
    precision: str = "auto"

    def check(self) -> None:
        if self.samples < 1:
            raise InputError("--samples", f"K must be >= 1, got {self.samples}")
        if not np.isfinite(self.lam) or self.lam < 0:
            raise InputError("--lambda", f"must be >= 0, got {self.lam}")
        if self.iterations < 1:
            raise InputError("--iterations", f"must be >= 1, got {self.iterations}")
        if self.variant not in VARIANTS:
            raise InputError("--vi-variant", f"unknown variant {self.variant!r}; expected one of {', '.join(VARIANTS)}")
        if self.estimator not in ESTIMATORS:
            raise InputError("--vi-estimator", f"unknown estimator {self.estimator!r}; expected one of {', '.join(ESTIMATORS)}")
        if self.variance not in VARIANCES:
            raise InputError("--vi-variance", f"unknown variance {self.variance!r}; expected one of {', '.join(VARIANCES)}")
        if self.noise_level is not None and not self.noise_level > 0:
            raise InputError("--noise-level", f"must be > 0 ppm, got {self.noise_level}")
        for estimate in (self.noise_estimate, self.sigma_estimate):
            if estimate not in NOISE_ESTIMATES:
                raise InputError("--noise-level", f"unknown estimate {estimate!r}; expected a number (ppm) or "
                                                  f"one of {', '.join(NOISE_ESTIMATES)}")
        if self.lr_final is not None and not 0 <= self.lr_final <= self.lr:
            raise InputError("VIConfig", f"lr_final must lie between 0 and lr ({self.lr:g}), got {self.lr_final}")
        if self.warmup < 0 or self.tv_iterations < 0 or not self.tv_start >= 1:
            raise InputError("VIConfig", f"warmup and tv_iterations must be >= 0 and tv_start >= 1, got "
                                         f"{self.warmup}, {self.tv_iterations}, {self.tv_start}")
        if not self.tol >= 0:
            raise InputError("--vi-tol", f"must be >= 0, got {self.tol}")
        if self.precision not in PRECISIONS:
            raise InputError("precision", f"unknown precision {self.precision!r}; expected one of {', '.join(PRECISIONS)}")


@dataclass
class VolumeData:
    """One field to fine-tune on, as tensors on the device, padded to the network's stride."""

    field: torch.Tensor  # (1, 1, X', Y', Z') ppm
    mask: torch.Tensor  # same shape, 0/1
    weight: torch.Tensor  # W, same shape
    edges: torch.Tensor  # M, (3, X', Y', Z')
    op: DipoleOperator
    size: tuple[int, int, int]  # of the cropped box, before padding to the stride
    geometry: Geometry
    box: tuple[slice, slice, slice]  # where the box sits in the full volume
    full_mask: np.ndarray
    inputs: torch.Tensor | None = None  # (1, C, X', Y', Z') ppm: the field and the prior channel, if any
    _diagonal: torch.Tensor | None = None
    kept: tuple[torch.Tensor, torch.Tensor] | None = None  # (blend, base): returned is blend mu + (1 - blend) base
    # the data term's blind directions (``harmonic_nuisance``): flat indices of the mask's voxels in the padded box,
    # and an orthonormal basis (k, N) of W h there, h the solid harmonics up to BLIND_DEGREE; None: none
    inside: torch.Tensor | None = None
    blind: torch.Tensor | None = None

    def in_box(self, volume: np.ndarray) -> torch.Tensor:
        """A full-size array cropped to the box and padded as the field is: (1, 1, X', Y', Z') float32."""
        x = torch.from_numpy(np.ascontiguousarray(volume[self.box], np.float32))[None, None]
        extra = [n - k for n, k in zip(self.field.shape[-3:], x.shape[-3:])]
        return torch.nn.functional.pad(x, (0, extra[2], 0, extra[1], 0, extra[0])).to(self.field.device)

    def keep(self, blend: np.ndarray, base: np.ndarray) -> None:
        """The map returned will be ``blend`` * the fine-tuned mean + (1 - ``blend``) * ``base`` (full-size arrays,
        ppm): fine-tuning then stops when that map has converged (``MapChange``), not the fine-tuned map at large."""
        self.kept = (self.in_box(blend), self.in_box(base))

    def misfit(self, chi: torch.Tensor) -> torch.Tensor:
        """||P W (D chi - b)||^2 of a map ``chi`` (ppm, zero outside the mask), P the projection off the span of W h,
        h the solid harmonics up to ``BLIND_DEGREE`` in the mask (``harmonic_nuisance``; none without ``blind``)."""
        r = self.weight * (self.op.forward(chi) - self.field)
        total = (r**2).sum()
        if self.blind is None:
            return total
        return total - ((self.blind @ r.reshape(-1)[self.inside].to(self.blind.dtype)) ** 2).sum()

    def network_inputs(self) -> torch.Tensor:
        return self.field if self.inputs is None else self.inputs

    def diagonal(self) -> torch.Tensor:
        """diag(D^T W^2 D), shape of the field: computed once, see ``fidelity_diagonal``."""
        if self._diagonal is None:
            self._diagonal = fidelity_diagonal(self.op, self.weight)
        return self._diagonal


# With --vi-harmonics ignore, PDI-VI's data term ignores the part of the residual that a field of sources outside the
# brain could explain: the solid harmonics of degree up to BLIND_DEGREE (constant, linear, quadratic). Such a field (a
# distant source, background removal's residue) is harmonic in the mask and no susceptibility inside should be fitted
# to it; as nuisance parameters fitted with the map, their least-squares values are the residual's projection (the
# profile likelihood). Not the default: a broad error of PDI's own map leaves a residual there too, which fine-tuning
# on the whole residual mends (session 39, benchmarks/results/vi_harmonics.md: a distant field of 0.005 ppm std on
# held-out brain 31004, fine-tuned everywhere, 113.9 % demeaned NRMSE whole, 83.8 blind, PDI 76.6; the first model
# on brain 32005, 60.1 whole, 77.9 blind, PDI 103.6).
BLIND_DEGREE = 2


@torch.no_grad()
def harmonic_nuisance(mask: np.ndarray, weight: np.ndarray | None, voxel_size, padded_shape,
                      degree: int = BLIND_DEGREE, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor] | None:
    """(flat indices of the mask's voxels in an array of ``padded_shape`` padded at the end of each axis, an
    orthonormal basis (k, N) float32 of the span of W h there), h the solid harmonics up to ``degree``
    (``weighting.harmonic_basis``); None for degree -1 or a mask of under 10 voxels a harmonic."""
    from .weighting import harmonic_basis

    m = np.asarray(mask) > 0
    if degree < 0 or m.sum() < 10 * (degree + 1) ** 2:
        return None
    q = np.linalg.qr(harmonic_basis(m, voxel_size, degree, weight))[0]
    flat = np.ravel_multi_index(np.nonzero(m), padded_shape)
    return (torch.from_numpy(flat).to(device), torch.from_numpy(np.ascontiguousarray(q.T, np.float32)).to(device))


@torch.no_grad()
def fidelity_diagonal(op: DipoleOperator, weight: torch.Tensor) -> torch.Tensor:
    """P_j = sum_i W_i^2 d_ij^2 = diag(D^T W^2 D): the expected data misfit ||W D e_j||^2 of unit noise
    in voxel j alone. D is a (circular, on the padded grid) convolution with the even kernel d, so P is
    W^2 convolved with d^2: one FFT pair. It makes the fidelity's expectation exact:
    E ||W (D (mu + sigma eps) - b)||^2 = ||W (D mu - b)||^2 + sum_j sigma_j^2 P_j. With the misfit projected off the
    harmonics (``VolumeData.misfit``) P_j would lose ||Q W D e_j||^2, about k / N of it (9 of a brain's million
    voxels): left out."""
    dims = (-3, -2, -1)
    d = torch.fft.irfftn(op.kernel, s=op.pad_shape, dim=dims)
    w2 = op.pad(weight.to(d.dtype) ** 2)
    p = torch.fft.irfftn(torch.fft.rfftn(w2, dim=dims) * torch.fft.rfftn(d * d, dim=dims), s=op.pad_shape, dim=dims)
    return op.crop(p).clamp_min(0.0)


def prepare(field_ppm: np.ndarray, mask: np.ndarray, geometry: Geometry, stride: int, weight: np.ndarray | None = None,
            edges: np.ndarray | None = None, device: str = "cpu", pad: float = 1.0, prior: str = "none",
            inputs: np.ndarray | None = None, blind_degree: int = -1) -> VolumeData:
    """Crop to the mask's bounding box (as inference does), pad to the network's stride, move to ``device``;
    ``prior`` is the network's prior channel kind (computed on the whole volume before cropping). ``inputs``: the
    network's input channels as ``network_io.network_inputs`` gives them (e.g. refilled); built here when None.
    ``blind_degree`` >= 0: the data term blind to the solid harmonics up to that degree (``harmonic_nuisance``)."""
    m = np.asarray(mask) > 0
    box = mask_box(m)
    mb = m[box]
    if inputs is None:
        inputs = network_inputs(prior, field_ppm, m, geometry, weight)
    x = torch.from_numpy(inputs[(slice(None),) + box])[None]
    x, size = pad_to_stride(x, stride)
    f = x[:, :1]
    inputs = x.to(device) if x.shape[1] > 1 else None
    padded = lambda a: pad_to_stride(torch.from_numpy(np.asarray(a, np.float32))[None], stride)[0][0]  # noqa: E731
    mt = padded(mb.astype(np.float32))
    w = padded(np.asarray(weight)[box] if weight is not None else mb.astype(np.float32))
    e = padded(np.asarray(edges)[(slice(None),) + box]) if edges is not None else mt.expand(3, *mt.shape)
    op = DipoleOperator(tuple(f.shape[-3:]), geometry, pad, torch.float32, device)
    nuisance = harmonic_nuisance(mb, None if weight is None else np.asarray(weight)[box], geometry.voxel_size,
                                 tuple(f.shape[-3:]), blind_degree, device) or (None, None)
    return VolumeData(f.to(device), mt[None, None].to(device), w[None, None].to(device), e.to(device), op, size,
                      geometry, box, m, inputs, inside=nuisance[0], blind=nuisance[1])


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor, data: VolumeData, lam: float, samples: int,
            noise_level: float, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Eq. 11 (Eq. 12 when lam = 0), mean and log variance in ppm units; returns each term and the total."""
    m = data.mask
    std = torch.exp(0.5 * logvar)
    entropy = -0.5 * (logvar * m).sum()
    fidelity = torch.zeros((), device=mean.device)
    tv = torch.zeros((), device=mean.device)
    for _ in range(samples):
        eps = torch.randn(mean.shape, generator=generator, device=mean.device)
        chi = (mean + std * eps) * m
        fidelity = fidelity + data.misfit(chi) / samples
        if lam > 0:
            tv = tv + (data.edges * grad(chi[0, 0], data.geometry.voxel_size).abs()).sum() / samples
    scale = 1.0 / (2.0 * noise_level**2)
    total = entropy + scale * (fidelity + lam * tv)
    return {"loss": total, "entropy": entropy, "fidelity": scale * fidelity, "tv": scale * lam * tv}


def expected_kl(mean: torch.Tensor, logvar: torch.Tensor, data: VolumeData, lam: float,
                noise_level: float, misfit: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Eq. 11 (Eq. 12 when lam = 0) with the expectation over q taken in closed form, not sampled.

    q is a product of Gaussians, so the fidelity's expectation is exact (``fidelity_diagonal``), and
    each component of M grad chi is one Gaussian, N(a, v) with a = grad(mu) and v the sum of the two
    voxels' variances over h^2, whose absolute value has the mean sqrt(2v/pi) exp(-a^2/2v) + a erf(a/sqrt(2v)).
    The loss and its gradient are those of K -> infinity, without Monte Carlo noise; one dipole
    convolution per iteration instead of K. ``misfit``: ||W (D mean - b)||^2 when the mean is fixed and it is
    known (``settle_variances``), which spares the dipole convolution.
    """
    m = data.mask
    var = torch.exp(logvar) * m
    mu = mean * m
    entropy = -0.5 * (logvar * m).sum()
    fidelity = (data.misfit(mu) if misfit is None else misfit) + (var * data.diagonal()).sum()
    tv = torch.zeros((), device=mean.device)
    if lam > 0:
        h = data.geometry.voxel_size
        a = grad(mu[0, 0], h)
        v = torch.stack([(torch.roll(var[0, 0], -1, d) + var[0, 0]) / hd**2 for d, hd in zip((-3, -2, -1), h)]) + 1e-12
        tv = ExpectedAbs.apply(a, v, data.edges)
    scale = 1.0 / (2.0 * noise_level**2)
    return {"loss": entropy + scale * (fidelity + lam * tv), "entropy": entropy, "fidelity": scale * fidelity,
            "tv": scale * lam * tv}


class ExpectedAbs(torch.autograd.Function):
    """sum(w * E|N(a, v)|) elementwise, E|N(a, v)| = sqrt(2v/pi) exp(-a^2/2v) + a erf(a/sqrt(2v)), in one pass
    with its derivatives in closed form: d/da = erf(a/sqrt(2v)), d/dv = exp(-a^2/2v) / sqrt(2 pi v) (the two
    terms in a^2 cancel). Autograd's chain through the expression took 1.3 s of a 160^3 brain's ~5 s PDI-VI
    iteration (its ~40 elementwise passes over the three gradient components); this takes a handful.
    ``w`` (the TV edge mask) gets no gradient."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        root_pi = math.sqrt(math.pi)
        s = (2.0 * v).sqrt_()
        r = a / s
        gv = r.square().neg_().exp_()  # exp(-a^2/2v)
        ga = r.erf_().mul_(w)  # w erf(a/sqrt(2v)): d/da, weighted
        gv.mul_(w)
        total = (gv * s).sum() / root_pi + (a * ga).sum()
        ctx.save_for_backward(ga, gv.div_(s).div_(root_pi))  # w exp(-a^2/2v) / sqrt(2 pi v): d/dv, weighted
        return total

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        ga, gv = ctx.saved_tensors
        return (ga * g if ctx.needs_input_grad[0] else None), (gv * g if ctx.needs_input_grad[1] else None), None


class Model:
    """The network split for the chosen variant, with the cached inputs of its trainable part.

    With ``variance='voxel'`` the log-variance decoder is frozen: its output, computed once, is the
    starting point of one free log variance per voxel (``offsets``, one tensor per volume), the
    classical mean-field parameters, which the optimiser can set voxel by voxel."""

    def __init__(self, net: PDINet, variant: str, volumes: list[VolumeData], variance: str = "network",
                 bf16: bool = False) -> None:
        self.net = net
        self.bf16 = bf16
        self.variant = variant
        self.voxel = variance == "voxel"
        net.eval()
        for p in net.parameters():
            p.requires_grad_(variant == "full")
        decoders = (net.mean_decoder,) if variance == "voxel" else (net.mean_decoder, net.logvar_decoder)
        if variant == "decoders":
            params = [p for d in decoders for p in d.parameters()]
        elif variant == "last":
            params = [p for d in decoders for p in list(d.convs[-1].parameters()) + list(d.head.parameters())]
        else:
            params = list(net.parameters())
            if variance == "voxel":
                ignored = {id(p) for p in net.logvar_decoder.parameters()}
                params = [p for p in params if id(p) not in ignored]
        for p in net.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        self.params = params
        self.scaled = [stacked_input(v.network_inputs()) for v in volumes]
        self.cache, self.base, self.offsets = [], [], None
        for x in self.scaled:  # one encoder pass per volume gives the cache and the starting variances
            cached, base = self._features(x)
            self.cache.append(cached)
            self.base.append(base)
        if variant == "full":
            self.cache = None
        self.cache_bf16: dict[int, object] = {}  # the cache cast once, for bf16 passes (see ``_cached``)
        if self.voxel:
            self.offsets = [torch.zeros_like(b, requires_grad=True) for b in self.base]

    @torch.no_grad()
    def _features(self, x: torch.Tensor):
        """(what the trainable part starts from, the frozen log variance with 'voxel' variance)."""
        if self.variant == "full" and not self.voxel:
            return None, None  # nothing to cache or to start from
        bottom, skips = self.net.encode(x)
        base = None
        if self.voxel:
            logvar = self.net.logvar_decoder(bottom, skips)
            base = self.net.finish(torch.zeros_like(logvar), logvar, x)[1]  # (finish also adds any calibration)
        if self.variant == "full":
            return None, base
        if self.variant == "decoders":
            return (bottom, skips), base
        logvar = None if self.voxel else self.net.logvar_decoder.trunk(bottom, skips)  # unused with 'voxel'
        return (self.net.mean_decoder.trunk(bottom, skips), logvar), base

    def __call__(self, index: int, v: VolumeData) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean ppm, log variance in ppm^2) for volume ``index``; the network's passes under bf16 autocast
        when ``self.bf16``, everything after them (prior channel, dipole model, loss) in fp32."""
        x = self.scaled[index]
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            mean, logvar = self._passes(index)
        mean = mean.float()
        if self.voxel:
            mean = self.net.finish(mean, torch.zeros_like(mean), x)[0]
            return mean / CHI_SCALE, self.voxel_logvar(index)
        mean, logvar = self.net.finish(mean, logvar.float(), x)
        return mean / CHI_SCALE, to_ppm2(logvar)

    def _passes(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The trainable part's raw (mean, log variance) outputs; log variance None with 'voxel' variance."""
        x = self.scaled[index]
        voxel = self.voxel
        if self.variant == "full":
            features = self.net.encode(x)
            mean = self.net.mean_decoder(*features)
            logvar = None if voxel else self.net.logvar_decoder(*features)
        elif self.variant == "decoders":
            mean = self.net.mean_decoder(*self._cached(index))
            logvar = None if voxel else self.net.logvar_decoder(*self._cached(index))
        else:
            a, b = self._cached(index)
            mean = self.net.mean_decoder.tail(a)
            logvar = None if voxel else self.net.logvar_decoder.tail(b)
        return mean, logvar

    def _cached(self, index: int):
        """Volume ``index``'s cached features, cast to bf16 once for bf16 passes. Autocast would cast them at
        every pass, after first promoting each bf16 upsampled tensor to fp32 to concatenate it with an fp32
        skip (see ``benchmarks/results/vi_speed_cpu_epyc.md`` for what it saves). The convolutions read the
        same bf16 values either way; the sums may round differently (the losses agree to 1e-6)."""
        if not self.bf16:
            if self.cache[index] is None:
                raise RuntimeError("fp32 pass after the fp32 feature cache was freed (see bf16_only)")
            return self.cache[index]
        if index not in self.cache_bf16:
            self.cache_bf16[index] = _to_bf16(self.cache[index])
        return self.cache_bf16[index]

    def bf16_only(self) -> None:
        """Once every remaining pass is bf16: each volume's cached features kept in bf16 alone, the fp32 copy freed
        (it would otherwise stay beside its bf16 copy, half the cache's memory again). No-op without a cache."""
        if self.cache is None:
            return
        for index, cached in enumerate(self.cache):
            if cached is not None and index not in self.cache_bf16:
                self.cache_bf16[index] = _to_bf16(cached)
            self.cache[index] = None

    def voxel_logvar(self, index: int) -> torch.Tensor:
        """Volume ``index``'s free per-voxel log variance ('voxel' variance) in ppm^2: no network pass."""
        return to_ppm2(self.base[index] + self.offsets[index])


def _to_bf16(x):
    """Tensors, nested in tuples and lists, cast to bf16 in their own memory layout; None stays None."""
    if isinstance(x, (tuple, list)):
        return type(x)(_to_bf16(t) for t in x)
    return None if x is None else x.to(torch.bfloat16)


def to_ppm2(logvar: torch.Tensor) -> torch.Tensor:
    """A network-scaled log variance, softly limited (``clamp_logvar``), in ppm^2."""
    return clamp_logvar(logvar) - 2.0 * float(np.log(CHI_SCALE))


@torch.no_grad()
def estimate_noise_level(volumes: list[VolumeData], kind: str = "white") -> float:
    """Field noise s (ppm where W = 1) from the data alone, the RMS over ``volumes``.

    'cone': what no susceptibility map can explain, read off the magic-angle cone of the
    weighted field (``fieldstats.cone_noise``, the estimate behind Tikhonov's and MEDI's automatic
    lambda). Real fields carry a non-dipolar part (anisotropy, background residue, correlated noise)
    several times their white noise; on realistic simulated brains the cone reads 0.0032 / 0.0048 ppm
    where the whole misfit of the true map is 0.0036 / 0.0049, and the white-noise estimate 0.0024 /
    0.00045. On a clean field with strong sources it reads high (4.1e-3 on the lesion phantom with
    1e-3 white noise: the truncated field of a 1.2 ppm lesion leaks into the cone).

    'white' (default): the separable second difference (1, -2, 1) along all three axes of W b: white noise of
    std s gives std sqrt(6^3) s, a smooth tissue field is cancelled where it is locally polynomial of
    degree < 2 along any one axis; the median absolute response inside the eroded mask gives s.
    Measured with 1e-3 ppm noise: 1.05 / 1.16 / 1.29 times the truth at 1 / 1.5 / 3 mm slices.

    Why two levels (``VIConfig.noise_estimate`` for tuning, ``sigma_estimate`` for the sigma reported):
    the voxel variances go to about s / sqrt(P_j), so an s read from white noise alone makes sigma several
    times too narrow on real fields (2-sigma coverage 0.11-0.22 on realistic brains; 0.80-0.86 with the
    cone). But tuning the mean with the cone's larger s made it worse (realistic brain 31001, VI1: 76.5 %
    exact and 74.9 % with K = 5 samples, against 66.1 % and 67.6 % with the white s): a wider sigma blurs the TV
    prior's expectation into a weak quadratic one and adds sampling noise to the mean's gradient. (Without
    the TV term and samples, Adam makes the mean's path nearly independent of s, whose scale it divides
    out: VI2 on the lesion phantom, 40.0 % with the cone s, 39.5 % with the white.) So the mean is tuned
    at the white level, as MEDI's L1 prior would see it, and sigma is then settled for the whole misfit
    no map explains. (Learning s as the ELBO's maximiser does not work with a
    variance per voxel and a flat prior: with each sigma at its optimum s^2 / P_j the KL is
    ||W (D mu - b)||^2 / 2 s^2 + const, which falls without end as s grows.)
    """
    from .fieldstats import cone_noise, second_difference_noise

    if kind not in NOISE_ESTIMATES:
        raise InputError("--noise-level", f"unknown estimate {kind!r}; expected one of {', '.join(NOISE_ESTIMATES)}")
    levels = []
    for v in volumes:
        weighted, inside = (v.field[0, 0] * v.weight[0, 0]).double().cpu().numpy(), (v.mask[0, 0] > 0).cpu().numpy()
        try:
            level = cone_noise(weighted, inside, v.geometry) if kind == "cone" else second_difference_noise(weighted, inside)
        except ValueError:  # field_stats: too few mask voxels, or a grid without a cone
            level = float("nan")
        if not level > 0:
            raise InputError("mask", "too small or thin to estimate the noise level from the field; give --noise-level")
        levels.append(level)
    return float(np.sqrt(np.mean(np.square(levels))))


@dataclass
class FinetuneResult:
    net: PDINet
    history: list[dict] = field(default_factory=list)
    noise_level: float = 0.0
    seconds: float = 0.0
    log_variances: list[torch.Tensor] | None = None  # 'voxel' variance: per volume, ppm^2, padded box
    sigma_noise_level: float = 0.0  # the s the voxel variances were settled for
    precision: str = ""  # how the network's passes ran (and, with 'auto' on a CPU, the trial's timings)

    def predict(self, v: VolumeData, index: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std (ppm) of training volume ``index`` (``v``): the tuned network's mean, and the
        per-voxel variances when they were tuned ('voxel'), else the network's."""
        return predict_volume(self.net, v, self.log_variances[index] if self.log_variances else None)


@reuse_freed_memory()
def finetune(net: PDINet, volumes: list[VolumeData], config: VIConfig,
             progress: Callable[[int, int], None] | None = None,
             log: Callable[[dict], None] | None = None, validation: VolumeData | None = None,
             validate_every: int = 10) -> FinetuneResult:
    """Fine-tune a copy of ``net`` on ``volumes`` (cycled, one per iteration); ``net`` is left unchanged.

    Stops early when every volume's mean map moved less than ``config.tol`` (relative L2 in the mask)
    over the last ``CHANGE_WINDOW`` iterations. With 'voxel' variance, the variances are then set for
    the mean reached (``settle_variances``), at the noise level of ``config.sigma_estimate``. With a ``validation`` volume, its loss (fixed noise draws)
    is checked every ``validate_every`` iterations and the weights with the lowest one are returned.
    """
    config.check()
    tuned = copy.deepcopy(net)
    device = str(volumes[0].field.device)
    trial = PrecisionTrial(config, device, len(volumes))
    model = Model(tuned, config.variant, volumes + ([validation] if validation is not None else []), config.variance,
                  trial.bf16)
    noise = config.noise_level or estimate_noise_level(volumes, config.noise_estimate)
    best = (float("inf"), None)
    groups = [{"params": model.params, "lr": config.lr}]
    if model.offsets is not None:
        groups.append({"params": model.offsets[:len(volumes)], "lr": config.voxel_lr})
    opt = Adam(groups)
    gen = torch.Generator(device=volumes[0].field.device).manual_seed(config.seed)
    history: list[dict] = []
    change = MapChange(volumes, config.tol)
    t0 = time.perf_counter()
    for it in range(1, config.iterations + 1):
        i = (it - 1) % len(volumes)
        if config.warmup or config.lr_final is not None:
            groups[0]["lr"] = step_size(config, it)
        model.bf16 = trial.before(it)
        if model.bf16 and not trial.trying:
            model.bf16_only()
        started = time.perf_counter()
        mean, logvar = model(i, volumes[i])
        terms = loss_terms(mean, logvar, volumes[i], scheduled(config, it), noise, gen)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        trial.after(it, time.perf_counter() - started)
        record = {"iteration": it, **{k: v.item() for k, v in terms.items()}, "seconds": round(time.perf_counter() - t0, 2)}
        moved = change.update(it, i, mean)
        if moved is not None:
            record["change"] = moved
        if validation is not None and (it % validate_every == 0 or it == config.iterations):
            with torch.no_grad():
                mean_v, logvar_v = model(len(volumes), validation)
                val_gen = torch.Generator(device=validation.field.device).manual_seed(config.seed + 1)
                record["validation"] = float(loss_terms(mean_v, logvar_v, validation, config, noise, val_gen)["loss"])
            if record["validation"] < best[0]:
                best = (record["validation"], copy.deepcopy(tuned.state_dict()))
        history.append(record)
        if log:
            log(record)
        stop = change.converged()
        if progress:
            progress(it, it if stop else config.iterations)
        if stop:
            break
    if best[1] is not None:
        tuned.load_state_dict(best[1])
    for p in tuned.parameters():
        p.requires_grad_(False)
    logvars, sigma_noise = None, noise
    if model.offsets is not None:
        if config.noise_level is None and config.sigma_estimate != config.noise_estimate:
            sigma_noise = estimate_noise_level(volumes, config.sigma_estimate)
        logvars = settle_variances(model, volumes, config, sigma_noise)
    return FinetuneResult(tuned, history, noise, time.perf_counter() - t0, logvars, sigma_noise, trial.summary())


class PrecisionTrial:
    """Which precision the network's passes run in, iteration by iteration. Fixed unless ``config.precision``
    is 'auto' on a CPU with bf16 arithmetic (``network.use_bf16``) and there are iterations enough: then, with
    n volumes cycled, iterations 1..2n run in fp32 and 2n+1..4n in bf16 (the first cycle of each warms its
    kernels up), and the rest in bf16 only if its second cycle took under ``MARGIN`` of fp32's. The two are as
    accurate (see ``VIConfig.precision``), so the trial costs no more than the slower precision's 2n iterations."""

    MARGIN = 0.9  # bf16 must save a tenth: near-ties keep fp32, the reference precision

    def __init__(self, config: VIConfig, device: str, volumes: int = 1) -> None:
        self.n = volumes
        fixed = use_bf16(config.precision, device)
        self.trying = config.precision == "auto" and device == "cpu" and fixed and config.iterations >= 4 * volumes
        self.bf16 = False if self.trying else fixed
        self.seconds = [0.0, 0.0]  # fp32's and bf16's second cycle
        self.timed = False

    def before(self, it: int) -> bool:
        """The precision of iteration ``it`` (from 1)."""
        if self.trying:
            self.bf16 = it > 2 * self.n
        return self.bf16

    def after(self, it: int, seconds: float) -> None:
        """Iteration ``it`` took ``seconds``."""
        if not self.trying:
            return
        cycle = (it - 1) // self.n  # 0, 1: fp32; 2, 3: bf16
        if cycle in (1, 3):
            self.seconds[cycle // 2] += seconds
        if it == 4 * self.n:
            self.bf16 = self.seconds[1] < self.MARGIN * self.seconds[0]
            self.trying = False
            self.timed = True

    def summary(self) -> str:
        name = "bf16" if self.bf16 else "fp32"
        if not self.timed:
            return name
        fp32, bf16 = (t / self.n for t in self.seconds)
        return f"{name} (timed: an iteration {fp32:.2f} s in fp32, {bf16:.2f} s in bf16)"


class Adam:
    """Adam (Kingma & Ba), as ``torch.optim.Adam`` with its defaults (betas 0.9, 0.999, eps 1e-8, no weight decay):
    the same update, parameter by parameter, each with its own step count, and parameters without a gradient
    skipped. Written out because ``torch.optim``'s first optimizer imports ``torch._dynamo`` (1.0 s alone on 2 AMD
    EPYC cores; PDI-VI1 on held-out brain 31001, stopping after 11 iterations, 13.7 -> 13.2 s). ``groups``: dicts
    with 'params' and 'lr', whose 'lr' may be changed between steps."""

    BETAS = (0.9, 0.999)
    EPS = 1e-8

    def __init__(self, groups: list[dict]) -> None:
        self.param_groups = groups
        self.state: dict[int, list] = {}  # id(param): [steps, first moment, second moment]

    def zero_grad(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.BETAS
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state.setdefault(id(p), [0, torch.zeros_like(p), torch.zeros_like(p)])
                state[0] += 1
                t, m, v = state
                m.lerp_(p.grad, 1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(self.EPS)
                p.addcdiv_(m, denom, value=-group["lr"] / (1 - b1**t))


def step_size(config: VIConfig, it: int) -> float:
    """Adam's step on the network at iteration ``it``: ``lr``, raised linearly over ``warmup`` iterations and,
    with ``lr_final``, falling to it along a cosine over ``iterations``."""
    lr = config.lr
    if config.lr_final is not None:
        lr = cosine(lr, config.lr_final, (it - 1) / max(config.iterations - 1, 1))
    return lr * min(1.0, it / config.warmup) if config.warmup else lr


def scheduled(config: VIConfig, it: int) -> VIConfig:
    """``config`` with iteration ``it``'s TV weight (``tv_start`` lam falling to lam over ``tv_iterations``)."""
    if config.tv_iterations <= 0 or config.tv_start == 1.0 or it > config.tv_iterations:
        return config
    return replace(config, lam=config.lam * config.tv_start ** (1.0 - (it - 1) / config.tv_iterations))


CHANGE_WINDOW = 10  # iterations over which the mean map's movement is measured


class MapChange:
    """How far each volume's mean map moved over the last CHANGE_WINDOW iterations (relative L2 in the
    mask), and whether all moved less than ``tol`` (0: never). Where a volume's map is kept only in part
    (``VolumeData.keep``), the map measured is the one returned: fine-tuning stops when it stopped moving."""

    def __init__(self, volumes: list[VolumeData], tol: float) -> None:
        self.tol = tol
        self.masks = [v.mask[0, 0] > 0 for v in volumes]
        self.kept = [v.kept for v in volumes]  # the map returned, where it is not the fine-tuned one (VolumeData.keep)
        self.marks: list[torch.Tensor | None] = [None] * len(volumes)  # the map at the window's start
        self.moved: list[float | None] = [None] * len(volumes)

    @torch.no_grad()
    def update(self, it: int, index: int, mean: torch.Tensor) -> float | None:
        n = len(self.masks)
        if (it - 1 - index) % (CHANGE_WINDOW * n) != 0 and self.marks[index] is not None:
            return None
        now = mean.detach().float()
        if self.kept[index] is not None:
            blend, base = self.kept[index]
            now = blend * now + (1.0 - blend) * base
        now = now[0, 0][self.masks[index]]
        before, self.marks[index] = self.marks[index], now.clone()
        if before is None:
            return None
        self.moved[index] = float((now - before).norm() / now.norm().clamp_min(1e-12))
        return self.moved[index]

    def converged(self) -> bool:
        return self.tol > 0 and all(m is not None and m < self.tol for m in self.moved)


def settle_variances(model: Model, volumes: list[VolumeData], config: VIConfig, noise: float) -> list[torch.Tensor]:
    """The per-voxel log variances (ppm^2) for the mean reached. Returns one per volume.

    Without ``config.sigma_tv`` (the default) the TV term is left out, and the KL's optimum over each voxel's
    variance is exact whatever the mean: sigma_j^2 = s^2 / P_j (``fidelity_diagonal``), set directly in the mask.
    (Until session 29, 100 Adam steps from the network's log variance: on a 160^3 brain they ended within 0.7 %
    of it in sigma for 99.8 % of the voxels, up to 1.6x off in a few, and took 5 s on 2 AMD EPYC cores.) With
    ``sigma_tv``, ``config.variance_iterations`` Adam steps on the offsets alone with the mean fixed, the KL's
    expectation in closed form (``expected_kl``; the misfit is then a constant: no network pass, no FFT).

    Why the TV term is left out by default: PDI-VI1's TV weight guards the mean against fitting the non-dipolar
    field, it is not a belief about how far chi may stray, and with it sigma shrinks towards 2 s^2 / (lambda c): on
    realistic brain 31002 the 2-sigma coverage was 0.76 at lambda 1e-3 and 0.36 at 3e-3
    (``benchmarks/results/vi_trace_cpu.md``, session 11)."""
    out = []
    for i, v in enumerate(volumes):
        if not config.sigma_tv:
            with torch.no_grad():
                optimum = torch.log(noise**2 / v.diagonal().clamp_min(1e-30)) + 2.0 * math.log(CHI_SCALE)
                model.offsets[i].copy_(torch.where(v.mask > 0, optimum - model.base[i], model.offsets[i]))
                out.append(model.voxel_logvar(i))
            continue
        with torch.no_grad():
            mean, _ = model(i, v)
            misfit = v.misfit(mean * v.mask)  # fixed: one convolution
        offsets = model.offsets[i]
        opt = Adam([{"params": [offsets], "lr": config.voxel_lr}])
        for _ in range(config.variance_iterations):
            loss = expected_kl(mean, model.voxel_logvar(i), v, config.lam, noise, misfit)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            out.append(model.voxel_logvar(i))
    return out


def loss_terms(mean: torch.Tensor, logvar: torch.Tensor, data: VolumeData, config: VIConfig, noise_level: float,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The KL of ``config``: sampled (``kl_loss``, K = config.samples) or exact (``expected_kl``)."""
    if config.estimator == "exact":
        return expected_kl(mean, logvar, data, config.lam, noise_level)
    return kl_loss(mean, logvar, data, config.lam, config.samples, noise_level, generator)


@torch.no_grad()
def predict_volume(model_net: PDINet, v: VolumeData, logvar: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (ppm) of a prepared volume, in the full volume's grid, zero outside the mask;
    ``logvar`` (ppm^2, from ``FinetuneResult.log_variances``) replaces the network's variance."""
    model_net.eval()
    mean, std = run_network(model_net, v.network_inputs(), str(v.field.device))
    if logvar is not None:
        std = torch.exp(0.5 * logvar)[0, 0].cpu().numpy()
    crop = tuple(slice(0, n) for n in v.size)
    return paste(mean[crop], v.full_mask, v.box), paste(std[crop], v.full_mask, v.box)
