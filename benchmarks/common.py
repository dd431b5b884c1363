"""Shared helpers for the benchmark scripts: machine description and table output."""

from __future__ import annotations

import os
import platform
from datetime import date
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
ICH_LEVEL, ICH_SEED = 1e-3, 0  # the shared ICH case as scored: noise s (ppm where the noise map is its median), draw


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads){gpu}, "
            f"Python {platform.python_version()}, {date.today().isoformat()}")


def ich_case(uniform_noise: bool = False):
    """The shared ICH case at ICH_LEVEL / ICH_SEED: (chi, mask, noise map, geometry, field), all ppm;
    ``uniform_noise``: one noise level everywhere (the noise map all ones), so W = 1."""
    from PDIQSMLib.geometry import Geometry
    from PDIQSMLib.simulate_cli import ich_field, load_ich

    chi, mask, noise, like = load_ich()
    if uniform_noise:
        noise = np.ones_like(noise)
    g = Geometry(like.voxel_size)
    return chi, mask, noise, g, ich_field(chi, mask, noise, ICH_LEVEL, ICH_SEED, g)


def ich_bleed(chi: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The ICH case's bleed as the benchmarks score it: the mask's voxels above 1 ppm."""
    return (chi > 1.0) & mask


def masked_blur(x: np.ndarray, mask: np.ndarray, width: float) -> np.ndarray:
    """Gaussian average (``width`` voxels) of ``x`` over ``mask`` only: x taken as zero outside, divided by the
    blurred mask (so voxels near the edge average the mask's voxels, not the zeros beyond it)."""
    from scipy import ndimage

    m = np.asarray(mask) > 0
    num = ndimage.gaussian_filter(np.where(m, x, 0.0).astype(np.float64), width)
    return num / np.maximum(ndimage.gaussian_filter(m.astype(np.float64), width), 1e-6)


def unexplained(field: np.ndarray, chi: np.ndarray, region: np.ndarray, geometry) -> np.ndarray:
    """The field's part that ``chi``'s dipole field does not explain, b - D chi (float64, ppm), demeaned over
    ``region`` and zero outside it; chi's field is computed from all of chi (``simulation.field_of``)."""
    from PDIQSMLib.simulation import field_of

    r = np.asarray(region) > 0
    rest = np.where(r, np.asarray(field, np.float64) - field_of(chi, r, geometry), 0.0)
    rest[r] -= rest[r].mean()
    return rest


def mean_rows(per_method: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Each method's score rows (one per brain) averaged column by column, for ``format_table``."""
    return {m: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]} for m, rs in per_method.items()}


def write_table(name: str, title: str, text: str) -> Path:
    """Print ``text`` and write it, with the machine, to benchmarks/results/<name>.md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    body = f"# {title}\n\nMachine: {machine()}\n\n{text}\n"
    print(body)
    path = RESULTS / f"{name}.md"
    path.write_text(body)
    return path
