"""How much memory a reconstruction needs, measured, and what to do when it does not fit.

Peak memory above the inputs, per voxel, measured on this project's CPU code by
``benchmarks/bench_memory.py`` (tables: benchmarks/results/memory_cpu.md, memory_cpu_vi.md), rounded up: TKD and
Tikhonov work on the padded grid (1.5x per axis by default), MEDI on the volume (pad 1), PDI and PDI-VI on the
mask's bounding box (PDI-VI keeps activations for the backward pass: its figure depends on the network's precision
and on the part of it tuned). Before a run, ``check`` compares the estimate with the memory available
(``MemAvailable``, or ``PDIQSM_MEMORY_GB`` to set a budget): PDI then runs in tiles small enough to fit (tiles of a
U-Net are blended over their overlap, see inference.predict); PDI-VI at auto precision takes bf16 where only that
fits (``pipeline.vi_memory_precision``); the others refuse up front with the estimate and the largest cube that fits.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import sys
import threading

import numpy as np

from .errors import InputError

# MEDI and PDI-VI keep freed memory while they iterate (reuse_freed_memory): at 160x160x96 (1 thread, session 13)
# MEDI 273 bytes per voxel against 244 without, hence 300.
BYTES_PER_VOXEL = {"tkd": 40, "tikhonov": 40, "medi": 300, "pdi": 720}  # per working voxel
# PDI-VI per working voxel by (the part of the network tuned, the precision of its passes): fine-tuned everywhere (its
# worst case) for 100 iterations at 160x160x96 (AMD EPYC, session 38; benchmarks/results/memory_cpu_vi.md): decoders
# fp32 826, bf16 566; the whole network fp32 1061, bf16 894; rounded up by about a fifth (the heap grows slowly with
# the iterations: fp32 784 / 831 / 864 after 3 / 30 / 100 in session 37). Tuning the last layers keeps no more than
# the decoders. Session 13's 2600 (tuned whole, before bf16) held until session 38.
VI_BYTES_PER_VOXEL = {("decoders", "fp32"): 1000, ("decoders", "bf16"): 700, ("full", "fp32"): 1300,
                      ("full", "bf16"): 1100}
# --vi-harmonics ignore (vi.harmonic_nuisance) keeps, per mask voxel, its flat index (int64) and the orthonormal basis
# of the 9 solid harmonics' W h (float32) through every iteration: 8 + 36 bytes, rounded up (session 39: +45).
VI_HARMONICS_BYTES_PER_MASK_VOXEL = 45
HEADROOM = 0.8  # of the available memory: the rest is for the inputs, outputs and the system


def available_bytes() -> int | None:
    """Memory a run may use: ``PDIQSM_MEMORY_GB`` if set, else Linux's MemAvailable; None if unknown."""
    budget = os.environ.get("PDIQSM_MEMORY_GB")
    if budget:
        return int(float(budget) * 2**30)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def working_voxels(method: str, shape, mask: np.ndarray | None, pad: float | None) -> int:
    """The voxels a method works on: padded grid, volume, or the mask's bounding box."""
    if method.startswith("pdi") and mask is not None and np.any(mask):
        from .inference import MASK_MARGIN

        idx = np.nonzero(mask)
        return int(np.prod([min(int(i.max() - i.min() + 1) + 2 * MASK_MARGIN, n) for i, n in zip(idx, shape)]))
    p = pad if pad is not None else (1.5 if method in ("tkd", "tikhonov") else 1.0)
    return int(np.prod([math.ceil(n * p) for n in shape]))


def bytes_per_voxel(method: str, precision: str = "fp32", variant: str | None = None) -> int:
    """Peak bytes per working voxel; for PDI-VI by the network's ``precision`` ('fp32' or 'bf16') and the ``variant``
    tuned (None: its default, the decoders)."""
    if method.startswith("pdi-vi"):
        return VI_BYTES_PER_VOXEL["full" if variant == "full" else "decoders", precision]
    return BYTES_PER_VOXEL[method]


def estimate_bytes(method: str, shape, mask: np.ndarray | None = None, pad: float | None = None,
                   precision: str = "fp32", variant: str | None = None, harmonics: bool = False) -> int:
    """Peak bytes of ``method`` on a volume of ``shape``; ``harmonics``: PDI-VI's data term blind to the low-order
    harmonics (--vi-harmonics ignore), which adds VI_HARMONICS_BYTES_PER_MASK_VOXEL per mask voxel (every voxel of
    ``shape`` without a mask). The largest cube ``check`` names leaves that share out (a few % of PDI-VI's figure)."""
    need = bytes_per_voxel(method, precision, variant) * working_voxels(method, shape, mask, pad)
    if harmonics and method.startswith("pdi-vi"):
        voxels = int(np.count_nonzero(mask)) if mask is not None else int(np.prod(shape))
        need += VI_HARMONICS_BYTES_PER_MASK_VOXEL * voxels
    return need


def largest_cube(method: str, budget: int, pad: float | None = None, precision: str = "fp32",
                 variant: str | None = None) -> int:
    """The side of the largest cubic volume whose estimate fits ``budget`` bytes."""
    p = pad if pad is not None else (1.5 if method in ("tkd", "tikhonov") else 1.0)
    per = bytes_per_voxel(method, precision, variant)
    side = int((budget / per) ** (1.0 / 3.0) / (p if not method.startswith("pdi") else 1.0)) + 1
    while side > 1 and estimate_bytes(method, (side,) * 3, None, pad, precision, variant) > budget:  # rounds up
        side -= 1
    return side


def tile_for(budget: int, method: str = "pdi") -> int:
    """A tile side (multiple of 16, at least 64) whose estimate fits ``budget``."""
    side = int((budget / BYTES_PER_VOXEL[method]) ** (1.0 / 3.0)) // 16 * 16
    return max(side, 64)


def budget_bytes() -> int | None:
    """What a run may take: ``HEADROOM`` of ``available_bytes``; None if unknown."""
    available = available_bytes()
    return None if available is None else int(HEADROOM * available)


def fits(need: int) -> bool:
    budget = budget_bytes()
    return budget is None or need <= budget


def check(method: str, shape, need: int, pad: float | None, source: str = "field", precision: str = "fp32",
          variant: str | None = None) -> int | None:
    """None when ``need`` bytes (``estimate_bytes``) fit; a tile side for PDI when they do not; InputError for
    the others (for PDI-VI the largest volume named at ``precision`` and ``variant``, as estimated)."""
    budget = budget_bytes()
    if budget is None or need <= budget:
        return None
    gib = lambda b: f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"  # noqa: E731
    if method == "pdi":
        return tile_for(budget)
    how = f" in {precision}" if method.startswith("pdi-vi") else ""
    raise InputError(source, f"{method} on shape {tuple(shape)} needs about {gib(need)}{how}, more than the "
                             f"{gib(budget)} this machine can give it; the largest volume that fits is about "
                             f"{largest_cube(method, budget, pad, precision, variant)}^3 voxels (crop the field to the "
                             "brain, or run on a machine with more memory; PDI runs in tiles)")


# glibc's mallopt parameters and their defaults (malloc.h): large blocks are mmap'ed and unmapped on free.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_INT_MAX = 2**31 - 1
_held = 0  # nesting depth of reuse_freed_memory
_lock = threading.Lock()


def _glibc():
    """The process's C library when it is glibc (mallopt and malloc_trim), else None."""
    if not sys.platform.startswith("linux") or os.environ.get("PDIQSM_REUSE_MEMORY", "1") == "0":
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not all(hasattr(libc, name) for name in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
        return None  # musl and others: nothing to set
    return libc


@contextlib.contextmanager
def reuse_freed_memory():
    """Keep freed memory in the heap while iterating, and give it back to the system afterwards.

    glibc serves large blocks (above a threshold of 128 KiB that adapts up to 32 MiB) by mmap and unmaps them when
    freed, so an iterative method that frees and reallocates the same large tensors each iteration (MEDI's ADMM,
    PDI-VI's forward and backward passes) has the kernel hand it fresh zeroed pages every time. Measured on a
    160^3 brain (2-core Xeon, alone; ``benchmarks/bench_vi_speed.py``): about half of PDI-VI's iteration time went
    to those page faults (6.99 -> 3.67 s per iteration with the decoders tuned, MEDI 17.4 -> 13.0 s) for about
    40 % more peak memory (PDI-VI 3.8 -> 5.3 GB; fragments of the heap are not shared between sizes). Inside, large
    blocks come from the heap and freed ones stay there (trimmed only above 2 GiB free at its top); on exit
    glibc's defaults return and ``malloc_trim`` gives the free memory back. Nested use holds until the
    outermost exits. Does nothing except with glibc on Linux, or when ``PDIQSM_REUSE_MEMORY=0``."""
    global _held
    libc = _glibc()
    if libc is None:
        yield
        return
    with _lock:
        _held += 1
        if _held == 1:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX)
    try:
        yield
    finally:
        with _lock:
            _held -= 1
            if _held == 0:
                libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)
