"""How much memory a reconstruction needs, measured, and what to do when it does not fit.

Peak memory above the inputs, per voxel, measured on this project's CPU code by
``benchmarks/bench_memory.py`` (table: benchmarks/results/memory_cpu.md), rounded up: TKD and Tikhonov
work on the padded grid (1.5x per axis by default), MEDI on the volume (pad 1), PDI and PDI-VI on the
mask's bounding box (PDI-VI keeps activations for the backward pass). Before a run, ``check`` compares
the estimate with the memory available (``MemAvailable``, or ``PDIQSM_MEMORY_GB`` to set a budget): PDI
then runs in tiles small enough to fit (tiles of a U-Net are blended over their overlap, see
inference.predict); the other methods refuse up front with the estimate and the largest cube that fits.
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
# MEDI 273 bytes per voxel against 244 without, PDI-VI1 2250 against 1735 (its box), hence 300 and 2600.
BYTES_PER_VOXEL = {"tkd": 40, "tikhonov": 40, "medi": 300, "pdi": 720, "pdi-vi1": 2600, "pdi-vi2": 2600}  # per working voxel
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


def estimate_bytes(method: str, shape, mask: np.ndarray | None = None, pad: float | None = None) -> int:
    return BYTES_PER_VOXEL[method] * working_voxels(method, shape, mask, pad)


def largest_cube(method: str, budget: int, pad: float | None = None) -> int:
    """The side of the largest cubic volume whose estimate fits ``budget`` bytes."""
    p = pad if pad is not None else (1.5 if method in ("tkd", "tikhonov") else 1.0)
    side = int((budget / BYTES_PER_VOXEL[method]) ** (1.0 / 3.0) / (p if not method.startswith("pdi") else 1.0)) + 1
    while side > 1 and estimate_bytes(method, (side,) * 3, None, pad) > budget:  # the padded size rounds up
        side -= 1
    return side


def tile_for(budget: int, method: str = "pdi") -> int:
    """A tile side (multiple of 16, at least 64) whose estimate fits ``budget``."""
    side = int((budget / BYTES_PER_VOXEL[method]) ** (1.0 / 3.0)) // 16 * 16
    return max(side, 64)


def check(method: str, shape, need: int, pad: float | None, source: str = "field") -> int | None:
    """None when ``need`` bytes (``estimate_bytes``) fit; a tile side for PDI when they do not; InputError for
    the others."""
    available = available_bytes()
    if available is None:
        return None
    budget = int(HEADROOM * available)
    if need <= budget:
        return None
    gib = lambda b: f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"  # noqa: E731
    if method == "pdi":
        return tile_for(budget)
    raise InputError(source, f"{method} on shape {tuple(shape)} needs about {gib(need)}, more than the {gib(budget)} "
                             f"this machine can give it; the largest volume that fits is about "
                             f"{largest_cube(method, budget, pad)}^3 voxels (crop the field to the brain, or run on a "
                             "machine with more memory" + ("; PDI runs in tiles" if method != "pdi" else "") + ")")


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
