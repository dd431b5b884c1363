"""Whole-volume PDI prediction: pad to the network's stride, run, crop; mean and std in ppm."""

from __future__ import annotations

import numpy as np
import torch

from .network import PDINet
from .training import from_output, to_input


def pick_device(name: str = "auto") -> str:
    """'auto' -> cuda if present, else mps, else cpu; an explicit name is checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA GPU is available")
    if name not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {name!r}; expected auto, cpu, cuda or mps")
    return name


def pad_to_stride(x: torch.Tensor, stride: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Zero-pad the last three dims up to multiples of ``stride``; also return the original size."""
    size = tuple(x.shape[-3:])
    extra = [(-n) % stride for n in size]
    return torch.nn.functional.pad(x, (0, extra[2], 0, extra[1], 0, extra[0])), size


@torch.no_grad()
def predict(net: PDINet, field: np.ndarray, mask: np.ndarray, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (ppm, float32) of chi for a local field (ppm), zero outside ``mask``."""
    net.eval()
    m = np.asarray(mask) > 0
    x = torch.from_numpy(np.where(m, field, 0.0).astype(np.float32))[None, None].to(device)
    x, size = pad_to_stride(x, net.config.stride)
    mean, logvar = net(to_input(x))
    mean, std = from_output(mean, logvar)
    crop = (0, 0) + tuple(slice(0, n) for n in size)
    mean = mean[crop].float().cpu().numpy()
    std = std[crop].float().cpu().numpy()
    return np.where(m, mean, 0.0).astype(np.float32), np.where(m, std, 0.0).astype(np.float32)
