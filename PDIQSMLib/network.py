"""The PDI network: a 3D U-Net with one encoder and two decoders (mean, log variance).

Input: local field (B, 1, X, Y, Z), ppm times ``FIELD_SCALE`` (and, with a prior, its Tikhonov
inverse in ppm times ``CHI_SCALE`` as a second channel). Outputs: mean chi (ppm times ``CHI_SCALE``)
and log variance in those scaled units, both (B, 1, X, Y, Z). X, Y, Z must be
multiples of ``stride`` (inference pads and crops).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .defaults import PRECISIONS

FIELD_SCALE = 10.0  # ppm -> network input units (fields are ~0.01-0.1 ppm)
CHI_SCALE = 10.0  # ppm -> network output units


@dataclass(frozen=True)
class UNetConfig:
    """Filters per level, top to bottom (the depth is their count), and the normalisation layer:
    'batch' (the paper's), 'group' (groups of 4 channels) or 'none' (convolutions with biases).

    Dipole inversion is linear: twice the field means twice the susceptibility. Group (and instance)
    normalisation divides each feature map by its own spread over the whole input, and the first
    convolution has no bias, so such a network returns the same chi for b and for 2b: it cannot
    learn the amplitude (measured on the first bundled model: output ratio 0.9998 for a doubled
    field). Batch norm keeps the amplitude at inference (fixed statistics) but not in training with
    small batches. 'none' has no statistics at all: a local operator, the same on a patch, a tile or
    a whole volume, that can learn the linear scaling; it is the default."""

    filters: tuple[int, ...] = (12, 24, 48, 96)
    norm: str = "none"
    prior: str = "none"  # 'tikhonov' or 'tikhonov-auto': a second input channel, see network_io
    upsample: str = "transpose"  # or 'resize': see UPSAMPLING

    @property
    def stride(self) -> int:
        return 2 ** (len(self.filters) - 1)

    @property
    def in_channels(self) -> int:
        return 1 if self.prior == "none" else 2

    def to_dict(self) -> dict:
        return {"filters": list(self.filters), "norm": self.norm, "prior": self.prior, "upsample": self.upsample}

    @staticmethod
    def from_dict(d: dict) -> "UNetConfig":
        return UNetConfig(tuple(int(f) for f in d["filters"]), str(d.get("norm", "batch")), str(d.get("prior", "none")),
                          str(d.get("upsample", "transpose")))


# A physics-informed input: the network sees, beside the field, its closed-form Tikhonov inverse
# (network_io.prior_map), which carries what the field alone hides from a convolutional network (the
# B0 direction and the voxel size through the dipole kernel); the mean decoder predicts a correction
# to it. q(chi | b) is still a function of the field b alone.
PRIORS = ("none", "tikhonov", "tikhonov-auto")

# Upsampling in the decoders. 'transpose' (the paper's 2x2x2 stride-2 transposed convolution) gives
# every output voxel one of 8 kernels by its position parity: a 3D checkerboard (22 % of the std map's
# mean on a real brain, issue 12). 'resize' (trilinear x2, then a 1x1x1 convolution) treats every
# voxel alike: no checkerboard.
UPSAMPLING = ("transpose", "resize")


PRESETS: dict[str, UNetConfig] = {
    "paper": UNetConfig((32, 64, 128, 256, 512), "batch"),  # MIDL 2020 architecture
    "default": UNetConfig((12, 24, 48, 96), "none", "tikhonov-auto", "resize"),  # compact: a 160^3 brain in ~5 s on 2 CPU cores
    "default-v1": UNetConfig((12, 24, 48, 96), "none", "tikhonov"),  # the first retrained model (fixed lambda, checkerboard)
    "default-field": UNetConfig((12, 24, 48, 96), "none"),  # the same, the field as the only input
    "default-gn": UNetConfig((12, 24, 48, 96), "group"),  # first bundled model (amplitude-blind, see above)
    "default-bn": UNetConfig((12, 24, 48, 96), "batch"),  # the compact net with the paper's batch norm
    "tiny": UNetConfig((4, 8), "batch"),  # tests only
    "tiny-prior": UNetConfig((4, 8), "none", "tikhonov"),  # tests only
    "tiny-auto": UNetConfig((4, 8), "none", "tikhonov-auto", "resize"),  # tests only
}


NORMS = ("batch", "group", "none")


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        return nn.GroupNorm(max(1, channels // 4), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalisation {kind!r}; expected one of {', '.join(NORMS)}")


def conv_relu(c_in: int, c_out: int, norm: str) -> list[nn.Module]:
    """3x3x3 convolution (biased when there is no normalisation; He-initialised), normalisation, ReLU."""
    conv = nn.Conv3d(c_in, c_out, 3, padding=1, bias=norm == "none")
    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return [conv, norm_layer(norm, c_out), nn.ReLU(inplace=True)]


def double_conv(c_in: int, c_out: int, norm: str = "batch") -> nn.Sequential:
    """Two 3x3x3 convolutions, each followed by normalisation and ReLU."""
    return nn.Sequential(*conv_relu(c_in, c_out, norm), *conv_relu(c_out, c_out, norm))


def upsampler(kind: str, deep: int, shallow: int) -> nn.Module:
    """x2 upsampling from ``deep`` to ``shallow`` channels (see UPSAMPLING)."""
    if kind == "transpose":
        return nn.ConvTranspose3d(deep, shallow, 2, stride=2)
    if kind == "resize":
        return ResizeUp(nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False), nn.Conv3d(deep, shallow, 1))
    raise ValueError(f"unknown upsampling {kind!r}; expected one of {', '.join(UPSAMPLING)}")


class ResizeUp(nn.Sequential):
    """Trilinear x2 upsampling, then a 1x1x1 convolution (the modules in that order, as the weights were saved),
    computed in the other order: the convolution is a per-voxel affine map across channels and each upsampled voxel
    an average of its neighbours with weights summing to 1, so the two commute (up to float rounding), and the
    convolution then runs on an eighth of the voxels and the upsampling on half the channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        upsample, conv = self
        y = conv(x)
        with torch.autocast(y.device.type, enabled=False):  # bf16 stays bf16 (autocast would upsample in fp32)
            return upsample(y)


class Decoder(nn.Module):
    """Upsampling with skip connections, ending in a 1x1x1 convolution."""

    def __init__(self, filters: tuple[int, ...], norm: str = "batch", upsample: str = "transpose") -> None:
        super().__init__()
        ups, convs = [], []
        for deep, shallow in zip(filters[:0:-1], filters[-2::-1]):
            ups.append(upsampler(upsample, deep, shallow))
            convs.append(double_conv(2 * shallow, shallow, norm))
        self.ups = nn.ModuleList(ups)
        self.convs = nn.ModuleList(convs)
        self.head = nn.Conv3d(filters[0], 1, 1)

    def forward(self, bottom: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        x = bottom
        for up, conv, skip in zip(self.ups, self.convs, reversed(skips)):
            x = level(conv, up(x), skip)
        return self.head(x)

    def trunk(self, bottom: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Everything before the last level's convolutions: the concatenated input of that level."""
        x = bottom
        pairs = list(zip(self.ups, self.convs, reversed(skips)))
        for up, conv, skip in pairs[:-1]:
            x = level(conv, up(x), skip)
        up, _, skip = pairs[-1]
        return torch.cat([up(x), skip], dim=1)

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        """The last level's convolutions and the 1x1x1 head."""
        return self.head(self.convs[-1](x))


def level(conv: nn.Sequential, up: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``conv(cat([up, skip]))``. Where the skip needs no gradient and ``up`` does (PDI-VI's decoders tuned on cached
    encoder features), the first convolution is split by input channels into one over ``up`` and one over the skip
    (convolution is linear in its input channels), so the backward pass computes no gradient for the skip: the top
    level's first convolution, forward and backward, took 0.75 s in place of 1.32 (bf16, 160^3, 2 AMD EPYC cores)."""
    first = conv[0]
    if not (torch.is_grad_enabled() and up.requires_grad and not skip.requires_grad):
        return conv(torch.cat([up, skip], dim=1))
    c = up.shape[1]
    pad = first.padding
    y = nn.functional.conv3d(up, first.weight[:, :c], None, padding=pad) + \
        nn.functional.conv3d(skip, first.weight[:, c:], first.bias, padding=pad)
    return conv[1:](y)


class PDINet(nn.Module):
    """Shared encoder; ``forward`` returns (mean, log variance), each (B, 1, X, Y, Z)."""

    def __init__(self, config: UNetConfig = PRESETS["default"]) -> None:
        super().__init__()
        self.config = config
        f = config.filters
        n = config.norm
        if config.prior not in PRIORS:
            raise ValueError(f"unknown prior input {config.prior!r}; expected one of {', '.join(PRIORS)}")
        self.encoders = nn.ModuleList([double_conv(config.in_channels, f[0], n)]
                                      + [double_conv(a, b, n) for a, b in zip(f[:-1], f[1:])])
        self.pool = nn.MaxPool3d(2)
        self.mean_decoder = Decoder(f, n, config.upsample)
        self.logvar_decoder = Decoder(f, n, config.upsample)
        self.logvar_offset = 0.0
        if config.prior != "none":  # training starts from the prior itself: a zero correction
            nn.init.zeros_(self.mean_decoder.head.weight)
            nn.init.zeros_(self.mean_decoder.head.bias)

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``inputs`` (B, in_channels, X, Y, Z): the scaled field, then the scaled prior if any."""
        bottom, skips = self.encode(inputs)
        return self.finish(*self.decode(bottom, skips), inputs)

    def finish(self, mean: torch.Tensor, logvar: torch.Tensor, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoders' raw outputs -> (mean, log variance): the mean decoder's output is a correction
        to the prior channel (when there is one); ``logvar_offset`` is a calibration of the variance
        (0 in training; set from held-apart data at export, see training.calibrate_std)."""
        if self.config.prior != "none":
            mean = mean + inputs[:, 1:2]
        return mean, logvar + self.logvar_offset if self.logvar_offset else logvar

    def decode(self, bottom: torch.Tensor, skips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean before the prior is added, log variance) from encoder features."""
        return self.mean_decoder(bottom, skips), self.logvar_decoder(bottom, skips)

    def channels_last(self) -> bool:
        """Whether the weights are stored channels-last (``fast_layout``): inputs are then laid out alike."""
        return self.encoders[0][0].weight.is_contiguous(memory_format=torch.channels_last_3d) and \
            not self.encoders[0][0].weight.is_contiguous()

    def encode(self, field: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encoder features (bottom, skips), for fine-tuning the decoders on cached features."""
        skips = []
        x = field.contiguous(memory_format=torch.channels_last_3d) if self.channels_last() else field
        for i, enc in enumerate(self.encoders):
            x = enc(x if i == 0 else self.pool(x))
            skips.append(x)
        return skips.pop(), skips


def fast_layout(net: PDINet, device: str) -> PDINet:
    """``net`` in the memory layout that is fastest on ``device``: channels-last on the CPU (measured per
    training step 0.97 -> 0.55 s, and per PDI-VI iteration, benchmarks/results/vi_speed_cpu.md), the
    default on GPUs (cuDNN picks its own). The numbers are the same up to float rounding."""
    return net.to(memory_format=torch.channels_last_3d) if not str(device).startswith("cuda") else net


def use_bf16(precision: str, device: str) -> bool:
    """Whether to run the network under bf16 autocast (training, PDI-VI): asked for, or 'auto' on a GPU or a
    CPU with bf16 arithmetic."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision == "bf16"
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    return bool(device == "cpu" and cpu is not None and (getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                                                         or getattr(cpu, "_is_amx_tile_supported", lambda: False)()))


def gaussian_nll(mean: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                 beta: float = 0.0) -> torch.Tensor:
    """Eq. 9 per voxel: 1/2 [(target - mean)^2 / sigma^2 + log sigma^2], averaged over mask voxels.

    ``beta`` > 0 weights each voxel's term by sigma^(2 beta) held constant (the beta-NLL of Seitzer et
    al., ICLR 2022): the minimiser is unchanged, but voxels with a large sigma no longer get a mean
    gradient shrunk by 1/sigma^2 (beta = 1 gives the mean the plain squared-error gradient). Eq. 9 is
    beta = 0 (the bundled model was trained with 0.5, then 1: see its model card).
    """
    m = (mask > 0).to(mean.dtype)
    per_voxel = 0.5 * ((target - mean) ** 2 * torch.exp(-logvar) + logvar)
    if beta:
        per_voxel = per_voxel * torch.exp(beta * logvar.detach())
    return (per_voxel * m).sum() / m.sum().clamp_min(1.0)
