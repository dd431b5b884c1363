"""Field units: everything inside the library is ppm of B0; conversion happens once, at the edge."""

from __future__ import annotations

import math

import numpy as np

from .errors import InputError

GAMMA_MHZ_PER_T = 42.577478518  # proton gyromagnetic ratio / 2 pi
UNITS = ("ppm", "hz", "rad")


def ppm_per_unit(units: str, b0_tesla: float | None = None, te_seconds: float | None = None) -> float:
    """Factor that turns a field in ``units`` into ppm.

    Hz: f / (gamma B0) with gamma in MHz/T gives ppm directly. Radians of phase at echo time TE:
    phi / (2 pi gamma B0 TE).
    """
    u = str(units).lower()
    if u not in UNITS:
        raise InputError("--units", f"unknown units {units!r}; expected one of {', '.join(UNITS)}")
    if u == "ppm":
        return 1.0
    if b0_tesla is None or not math.isfinite(b0_tesla) or b0_tesla <= 0:
        raise InputError("--b0", f"a field in {u} needs the field strength B0 in tesla (> 0), got {b0_tesla}")
    if u == "hz":
        return 1.0 / (GAMMA_MHZ_PER_T * b0_tesla)
    if te_seconds is None or not math.isfinite(te_seconds) or te_seconds <= 0:
        raise InputError("--te", f"a phase in radians needs the echo time TE in seconds (> 0), got {te_seconds}")
    return 1.0 / (2.0 * math.pi * GAMMA_MHZ_PER_T * b0_tesla * te_seconds)


def to_ppm(field: np.ndarray, units: str, b0_tesla: float | None = None, te_seconds: float | None = None) -> np.ndarray:
    """Return ``field`` converted to ppm (a new array; the input is left as it is)."""
    return np.asarray(field) * ppm_per_unit(units, b0_tesla, te_seconds)
