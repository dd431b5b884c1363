"""Unsupervised variational fine-tuning of PDI (Eqs. 11 and 12): PDI-VI1 (TV prior) and PDI-VI2 (flat prior).

For fields b without labels, minimise over the network weights

    KL = -1/2 sum log sigma^2 + 1/(2 s^2) [ (1/K) sum_k ||W (D chi_k - b)||^2 + lambda (1/K) sum_k ||M grad chi_k||_1 ]

with chi_k = mu + sigma eps_k (reparameterisation), K samples per iteration. W is MEDI's data weight
(mean 1 in the mask) and s the field noise level (ppm) where W = 1, so W/s is the paper's Sigma_b^-1/2;
lambda has the meaning it has in ``solvers.medi``. Without a given s, it is estimated from the field
itself (``estimate_noise_level``).

What sigma to expect: with a flat prior the mean-field optimum per voxel is about
sigma_j = s / sqrt(sum_i W_i^2 d_ij^2), i.e. about 3.4 s / W where the dipole kernel's energy
(4/45 on average) stays in weighted voxels; the TV term on the samples adds about lambda c sigma / (2 s^2)
per voxel (c ~ 3.4), which pulls sigma down to about 2 s^2 / (lambda c), 0.8e-3 ppm for s = 1.2e-3 ppm
and lambda = 1e-3 (measured on the ICH case: 0.77e-3). The tuned weights are shared by all voxels, so
a large step for the well-measured brain also moves voxels with large features (a hemorrhage) the most:
measured, sigma in the bleed falls to the lower bound with either prior (benchmarks/results/vi_cpu.md).

Variants trade speed for flexibility: 'full' tunes every weight; 'decoders' freezes the encoder and
caches its features; 'last' also caches everything before each decoder's last level, tuning only
those levels. Batch norm keeps its trained statistics throughout (eval mode).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .errors import InputError
from .geometry import Geometry
from .gradient import grad
from .inference import mask_box, network_inputs, pad_to_stride, paste, run_network
from .network import CHI_SCALE, PDINet
from .physics import DipoleOperator
from .solvers import MEDI_LAMBDA
from .training import clamp_logvar, stacked_input

VARIANTS = ("full", "decoders", "last")


@dataclass
class VIConfig:
    lam: float = MEDI_LAMBDA  # 0 gives PDI-VI2
    samples: int = 5
    iterations: int = 100
    lr: float = 1e-3
    variant: str = "last"
    noise_level: float | None = None  # ppm where W = 1; None: estimated
    tol: float = 0.0  # stop when the loss's relative change over 10 iterations is below this (0: never)
    seed: int = 0
    pad: float = 1.0

    def check(self) -> None:
        if self.samples < 1:
            raise InputError("--samples", f"K must be >= 1, got {self.samples}")
        if not np.isfinite(self.lam) or self.lam < 0:
            raise InputError("--lambda", f"must be >= 0, got {self.lam}")
        if self.iterations < 1:
            raise InputError("--iterations", f"must be >= 1, got {self.iterations}")
        if self.variant not in VARIANTS:
            raise InputError("--vi-variant", f"unknown variant {self.variant!r}; expected one of {', '.join(VARIANTS)}")
        if self.noise_level is not None and not self.noise_level > 0:
            raise InputError("--noise-level", f"must be > 0 ppm, got {self.noise_level}")


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

    def network_inputs(self) -> torch.Tensor:
        return self.field if self.inputs is None else self.inputs


def prepare(field_ppm: np.ndarray, mask: np.ndarray, geometry: Geometry, stride: int, weight: np.ndarray | None = None,
            edges: np.ndarray | None = None, device: str = "cpu", pad: float = 1.0, prior: str = "none") -> VolumeData:
    """Crop to the mask's bounding box (as inference does), pad to the network's stride, move to ``device``;
    ``prior`` is the network's prior channel kind (computed on the whole volume before cropping)."""
    m = np.asarray(mask) > 0
    box = mask_box(m)
    mb = m[box]
    x = torch.from_numpy(network_inputs(prior, field_ppm, m, geometry, weight)[(slice(None),) + box])[None]
    x, size = pad_to_stride(x, stride)
    f = x[:, :1]
    inputs = x.to(device) if x.shape[1] > 1 else None
    padded = lambda a: pad_to_stride(torch.from_numpy(np.asarray(a, np.float32))[None], stride)[0][0]  # noqa: E731
    mt = padded(mb.astype(np.float32))
    w = padded(np.asarray(weight)[box] if weight is not None else mb.astype(np.float32))
    e = padded(np.asarray(edges)[(slice(None),) + box]) if edges is not None else mt.expand(3, *mt.shape)
    op = DipoleOperator(tuple(f.shape[-3:]), geometry, pad, torch.float32, device)
    return VolumeData(f.to(device), mt[None, None].to(device), w[None, None].to(device), e.to(device), op, size,
                      geometry, box, m, inputs)


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
        residual = data.weight * (data.op.forward(chi) - data.field)
        fidelity = fidelity + (residual**2).sum() / samples
        if lam > 0:
            tv = tv + (data.edges * grad(chi[0, 0], data.geometry.voxel_size).abs()).sum() / samples
    scale = 1.0 / (2.0 * noise_level**2)
    total = entropy + scale * (fidelity + lam * tv)
    return {"loss": total, "entropy": entropy, "fidelity": scale * fidelity, "tv": scale * lam * tv}


class Model:
    """The network split for the chosen variant, with the cached inputs of its trainable part."""

    def __init__(self, net: PDINet, variant: str, volumes: list[VolumeData]) -> None:
        self.net = net
        self.variant = variant
        net.eval()
        for p in net.parameters():
            p.requires_grad_(variant == "full")
        if variant == "decoders":
            params = list(net.mean_decoder.parameters()) + list(net.logvar_decoder.parameters())
        elif variant == "last":
            params = [p for d in (net.mean_decoder, net.logvar_decoder)
                      for p in list(d.convs[-1].parameters()) + list(d.head.parameters())]
        else:
            params = list(net.parameters())
        for p in params:
            p.requires_grad_(True)
        self.params = params
        self.scaled = [stacked_input(v.network_inputs()) for v in volumes]
        self.cache = [self._features(x) for x in self.scaled] if variant != "full" else None

    @torch.no_grad()
    def _features(self, x: torch.Tensor):
        bottom, skips = self.net.encode(x)
        if self.variant == "decoders":
            return bottom, skips
        return self.net.mean_decoder.trunk(bottom, skips), self.net.logvar_decoder.trunk(bottom, skips)

    def __call__(self, index: int, v: VolumeData) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean ppm, log variance in ppm^2) for volume ``index``."""
        x = self.scaled[index]
        if self.variant == "full":
            mean, logvar = self.net(x)
        else:
            if self.variant == "decoders":
                mean, logvar = self.net.decode(*self.cache[index])
            else:
                a, b = self.cache[index]
                mean, logvar = self.net.mean_decoder.tail(a), self.net.logvar_decoder.tail(b)
            mean, logvar = self.net.finish(mean, logvar, x)
        return mean / CHI_SCALE, clamp_logvar(logvar) - 2.0 * float(np.log(CHI_SCALE))



@torch.no_grad()
def estimate_noise_level(volumes: list[VolumeData]) -> float:
    """Field noise (ppm where W = 1) from the data alone.

    The weighted field W b is filtered by the separable second difference (1, -2, 1) along all three
    axes: white noise of std s gives std sqrt(6^3) s, while the tissue field, smooth but for its
    sources, is cancelled wherever it is locally polynomial of degree < 2 along any one axis. The
    median absolute response inside the eroded mask (robust to the voxels near sources) gives s.
    Measured on simulated brains with 1e-3 ppm noise it reads 1.05 / 1.16 / 1.29 times the truth at
    1 / 1.5 / 3 mm slices (the 7-point Laplacian read 1.22 / 1.43 / 1.90), and 1.16 on the ICH case;
    the excess is tissue signal, so the estimate errs on the side of less weight on the data.
    """
    values = []
    for v in volumes:
        c = (v.field[0, 0] * v.weight[0, 0]).double()
        inner = v.mask[0, 0] > 0
        for d in range(3):
            c = torch.roll(c, 1, d) - 2.0 * c + torch.roll(c, -1, d)
            inner = inner & torch.roll(inner, 1, d) & torch.roll(inner, -1, d)
        if inner.any():
            values.append(c[inner].abs())
    if not values:
        raise InputError("mask", "too thin to estimate the noise level from the field; give --noise-level")
    return float(1.4826 * torch.cat(values).median() / math.sqrt(216.0))


@dataclass
class FinetuneResult:
    net: PDINet
    history: list[dict] = field(default_factory=list)
    noise_level: float = 0.0
    seconds: float = 0.0


def finetune(net: PDINet, volumes: list[VolumeData], config: VIConfig,
             progress: Callable[[int, int], None] | None = None,
             log: Callable[[dict], None] | None = None, validation: VolumeData | None = None,
             validate_every: int = 10) -> FinetuneResult:
    """Fine-tune a copy of ``net`` on ``volumes`` (cycled, one per iteration); ``net`` is left unchanged.

    With a ``validation`` volume, its loss (fixed noise draws) is checked every ``validate_every``
    iterations and the weights with the lowest one are returned (early stopping).
    """
    config.check()
    tuned = copy.deepcopy(net)
    model = Model(tuned, config.variant, volumes + ([validation] if validation is not None else []))
    noise = config.noise_level or estimate_noise_level(volumes)
    best = (float("inf"), None)
    opt = torch.optim.Adam(model.params, lr=config.lr)
    gen = torch.Generator(device=volumes[0].field.device).manual_seed(config.seed)
    history: list[dict] = []
    t0 = time.perf_counter()
    for it in range(1, config.iterations + 1):
        i = (it - 1) % len(volumes)
        mean, logvar = model(i, volumes[i])
        terms = kl_loss(mean, logvar, volumes[i], config.lam, config.samples, noise, gen)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        record = {"iteration": it, **{k: v.item() for k, v in terms.items()}, "seconds": round(time.perf_counter() - t0, 2)}
        if validation is not None and (it % validate_every == 0 or it == config.iterations):
            with torch.no_grad():
                mean_v, logvar_v = model(len(volumes), validation)
                val_gen = torch.Generator(device=validation.field.device).manual_seed(config.seed + 1)
                record["validation"] = float(kl_loss(mean_v, logvar_v, validation, config.lam, config.samples, noise, val_gen)["loss"])
            if record["validation"] < best[0]:
                best = (record["validation"], copy.deepcopy(tuned.state_dict()))
        history.append(record)
        if log:
            log(record)
        stop = _converged(history, config.tol)
        if progress:
            progress(it, it if stop else config.iterations)
        if stop:
            break
    if best[1] is not None:
        tuned.load_state_dict(best[1])
    for p in tuned.parameters():
        p.requires_grad_(False)
    return FinetuneResult(tuned, history, noise, time.perf_counter() - t0)


def _converged(history: list[dict], tol: float, window: int = 10) -> bool:
    if tol <= 0 or len(history) < 2 * window:
        return False
    recent = np.mean([h["loss"] for h in history[-window:]])
    before = np.mean([h["loss"] for h in history[-2 * window:-window]])
    return abs(before - recent) <= tol * abs(before)


@torch.no_grad()
def predict_volume(model_net: PDINet, v: VolumeData) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (ppm) of a prepared volume, in the full volume's grid, zero outside the mask."""
    model_net.eval()
    mean, std = run_network(model_net, v.network_inputs(), str(v.field.device))
    crop = tuple(slice(0, n) for n in v.size)
    return paste(mean[crop], v.full_mask, v.box), paste(std[crop], v.full_mask, v.box)
