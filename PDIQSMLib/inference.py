"""Whole-volume PDI prediction: pad to the network's stride, run, crop; mean and std in ppm."""

from __future__ import annotations

import numpy as np
import torch

from .defaults import REFLECTION_COUNTS
from .network import PDINet
from .network_io import from_output, network_inputs, stacked_input


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


MASK_MARGIN = 8  # voxels of background kept around the mask's bounding box


def mask_box(mask: np.ndarray, margin: int = MASK_MARGIN) -> tuple[slice, slice, slice]:
    """The mask's bounding box grown by ``margin`` voxels (clipped to the volume)."""
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + 1 + margin, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


# Mirrorings of the input averaged at inference (``predict(reflections=n)``), as axis tuples. Point
# reflection (all three axes) maps k to -k and leaves the dipole kernel unchanged for any B0 direction:
# the mirrored field is exactly the field of the mirrored source. A single axis negates B0's component
# along it; the network never sees B0 (its prior channel is mirrored with the field) and was trained on
# such mirrored patches (training.flip_patch), so those are valid inputs too.
REFLECTIONS = {1: ((),), 2: ((), (0, 1, 2)), 4: ((), (0, 1, 2), (0,), (1, 2)),
               8: ((), (0, 1, 2), (0,), (1, 2), (1,), (0, 2), (2,), (0, 1))}
assert tuple(REFLECTIONS) == REFLECTION_COUNTS


@torch.no_grad()
def predict(net: PDINet, field: np.ndarray, mask: np.ndarray, device: str = "cpu",
            tile: int | None = None, overlap: int = 16, geometry=None,
            weight: np.ndarray | None = None, reflections: int = 1,
            inputs: np.ndarray | None = None, passes: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (ppm, float32) of chi for a local field (ppm), zero outside ``mask``.

    The network runs on the mask's bounding box (plus a margin): outside the mask its input is zero,
    and the empty rest of the field of view would only cost time. ``tile`` (voxels per side) runs
    overlapping tiles blended with tapered weights, for volumes that do not fit in memory at once;
    on a CUDA out-of-memory error, tiles of 128 are used. ``geometry`` is needed by networks with a
    prior input channel, and ``weight`` (W, from a noise map) is used by that prior. ``reflections``
    (1, 2, 4 or 8, see REFLECTIONS) runs the network on mirrored inputs and mirrors each output back:
    the mean is their average, the variance that of their equal mixture (mean of the variances plus the
    variance of the means). ``inputs``: the network's input channels (ppm, the volume's shape) as
    ``network_io.network_inputs`` gives them for this field, mask, geometry and weight; built here when None.
    ``passes``: a list that gets each pass's own (mean, std), in REFLECTIONS' order (the first unmirrored).
    """
    if reflections not in REFLECTIONS:
        raise ValueError(f"reflections must be one of {sorted(REFLECTIONS)}, got {reflections}")
    net.eval()
    m = np.asarray(mask) > 0
    box = mask_box(m)
    if inputs is None:
        inputs = network_inputs(net.config.prior, field, m, geometry, weight)
    x = torch.from_numpy(inputs[(slice(None),) + box])[None]
    maps = []
    for axes in REFLECTIONS[reflections]:
        mean, std = _whole_or_tiled(net, torch.flip(x, [a + 2 for a in axes]) if axes else x, device, tile, overlap)
        maps.append((np.flip(mean, axes), np.flip(std, axes)) if axes else (mean, std))
    if passes is not None:
        passes.extend((paste(mu, m, box), paste(sd, m, box)) for mu, sd in maps)
    if len(maps) == 1:
        mean, std = maps[0]
    else:
        means = np.stack([mu for mu, _ in maps]).astype(np.float64)
        variances = np.stack([sd for _, sd in maps]).astype(np.float64) ** 2
        mean, std = means.mean(0), np.sqrt(variances.mean(0) + means.var(0))
    return paste(mean, m, box), paste(std, m, box)


def _whole_or_tiled(net: PDINet, x: torch.Tensor, device: str, tile: int | None, overlap: int):
    """One network pass on ``x``: whole, or in tiles when asked or when the GPU runs out of memory."""
    if tile is not None:
        return _tiled(net, x, device, tile, overlap)
    try:
        return run_network(net, x, device)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return _tiled(net, x, device, 128, overlap)


def paste(values: np.ndarray, mask: np.ndarray, box) -> np.ndarray:
    """``values`` computed on ``box`` placed into a zero volume of the mask's shape, zero outside the mask."""
    out = np.zeros(mask.shape, np.float32)
    out[box] = values
    return np.where(mask, out, 0.0).astype(np.float32)


def run_network(net: PDINet, x: torch.Tensor, device: str) -> tuple[np.ndarray, np.ndarray]:
    """Whole-volume pass on ``x`` (1, C, ...) in ppm (field, then prior): (mean, std) as float32 arrays
    of x's spatial shape."""
    padded, size = pad_to_stride(x.to(device), net.config.stride)
    mean, std = from_output(*net(stacked_input(padded)))
    crop = (0, 0) + tuple(slice(0, n) for n in size)
    return mean[crop].float().cpu().numpy(), std[crop].float().cpu().numpy()


def _starts(n: int, tile: int, step: int) -> list[int]:
    if n <= tile:
        return [0]
    starts = list(range(0, n - tile, step)) + [n - tile]
    return sorted(set(starts))


def _tiled(net: PDINet, x: torch.Tensor, device: str, tile: int, overlap: int) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping tiles, each weighted by a separable ramp that fades over ``overlap`` voxels."""
    if tile <= 2 * overlap:
        raise ValueError(f"tile ({tile}) must exceed twice the overlap ({overlap})")
    shape = tuple(x.shape[-3:])
    mean_sum = np.zeros(shape, np.float64)
    var_sum = np.zeros(shape, np.float64)
    weight_sum = np.zeros(shape, np.float64)
    step = tile - overlap
    for i in _starts(shape[0], tile, step):
        for j in _starts(shape[1], tile, step):
            for k in _starts(shape[2], tile, step):
                sl = (slice(i, i + tile), slice(j, j + tile), slice(k, k + tile))
                mean, std = run_network(net, x[(0, slice(None)) + sl][None], device)
                w = _taper(mean.shape, overlap)
                mean_sum[sl] += w * mean
                var_sum[sl] += w * std.astype(np.float64) ** 2
                weight_sum[sl] += w
    return (mean_sum / weight_sum).astype(np.float32), np.sqrt(var_sum / weight_sum).astype(np.float32)


def _taper(shape, overlap: int) -> np.ndarray:
    ramps = []
    for n in shape:
        r = np.ones(n)
        ramp = np.linspace(0.05, 1.0, min(overlap, n // 2) + 2)[1:-1]
        r[: ramp.size] = ramp
        r[n - ramp.size:] = np.minimum(r[n - ramp.size:], ramp[::-1])
        ramps.append(r)
    return ramps[0][:, None, None] * ramps[1][None, :, None] * ramps[2][None, None, :]
