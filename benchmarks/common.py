"""Shared helpers for the benchmark scripts: machine description and table output."""

from __future__ import annotations

import os
import platform
from datetime import date
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


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


def write_table(name: str, title: str, text: str) -> Path:
    """Print ``text`` and write it, with the machine, to benchmarks/results/<name>.md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    body = f"# {title}\n\nMachine: {machine()}\n\n{text}\n"
    print(body)
    path = RESULTS / f"{name}.md"
    path.write_text(body)
    return path
