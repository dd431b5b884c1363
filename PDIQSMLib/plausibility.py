"""Warnings for inputs that read without error but are very likely not what the user meant.

A local field in ppm is small: tissue susceptibility differences of a few tenths of a ppm give local
fields whose 99th percentile of |value| inside the brain is typically 0.02-0.2 ppm (a large bleed or
the sinus edge may reach ~1 ppm). A field read as ppm with a 99th percentile above ``PPM_LIMIT`` is
almost certainly in Hz (1 ppm is 128 Hz at 3 T) or radians (bounded by pi when wrapped). A "field" with
two distinct values inside the mask is a mask; one whose 99th percentile is below ``PPM_FLOOR`` after conversion is
in other units again (a fraction of B0 rather than ppm, TE in ms given as seconds, B0 in mT); a "mask" with many
values is a field, a probability map or a label image. The run goes on (the user may know better); the warning says what to pass instead.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

PPM_LIMIT = 1.0  # |field| 99th percentile (ppm) above which the units are doubted
PPM_FLOOR = 1e-3  # ... and below which they are (20 to 200 times under a brain's typical 0.02-0.2 ppm)


class InputWarning(UserWarning):
    """An input that is probably not what was meant; shown by ``pdiqsm`` as one line on stderr."""


def warn(message: str) -> None:
    warnings.warn(message, InputWarning, stacklevel=3)


def field_warnings(values_in_mask: np.ndarray, ppm_per_unit: float, units: str, name: str) -> list[str]:
    """What looks wrong with a field (raw values inside the mask, the factor to ppm and the units given)."""
    said = []
    v = np.asarray(values_in_mask, dtype=np.float64)
    if v.size == 0:
        return said
    distinct = np.unique(v[: min(v.size, 200_000)])
    if distinct.size <= 2:
        said.append(f"{name}: only {distinct.size} distinct value(s) inside the mask ({', '.join(f'{x:g}' for x in distinct)}): "
                    "is this a mask rather than a field?")
        return said
    p99 = float(np.percentile(np.abs(v), 99))
    p99_ppm = p99 * ppm_per_unit
    if p99_ppm > PPM_LIMIT:
        wrapped = float(np.max(np.abs(v))) <= math.pi * 1.001
        if units == "ppm":
            likely = ("radians of phase (values bounded by pi): pass --units rad --b0 T --te S" if wrapped
                      else "Hz: pass --units hz --b0 T")
            said.append(f"{name}: 99th percentile of |field| inside the mask is {p99:.3g}, implausible for a local field "
                        f"in ppm (typically < 0.2); likely {likely}")
        else:
            said.append(f"{name}: 99th percentile of |field| inside the mask is {p99_ppm:.3g} ppm after conversion from "
                        f"{units}, implausible for a local field (typically < 0.2 ppm): check --units, --b0 and --te")
    elif 0 < p99_ppm < PPM_FLOOR:
        hint = ("a field in units of B0 (not ppm) reads a million times too small: multiply it by 1e6"
                if units == "ppm" else "check --units, --b0 (tesla) and --te (seconds: 20 ms is 0.02)")
        said.append(f"{name}: 99th percentile of |field| inside the mask is {p99_ppm:.3g} ppm"
                    f"{'' if units == 'ppm' else ' after conversion from ' + units}, implausibly small for a local "
                    f"field (typically 0.02-0.2 ppm); {hint}")
    return said


def magnitude_warnings(values_in_mask: np.ndarray, name: str) -> list[str]:
    """A "magnitude" that cannot be one: negative values (a phase or a field?), or one value all over the brain
    (its edges, which MEDI's and PDI-VI1's TV spare, would be nowhere)."""
    v = np.asarray(values_in_mask, dtype=np.float64)
    if v.size and v.min() < 0:
        return [f"{name}: the magnitude holds negative values inside the mask: is it a phase or a field?"]
    if v.size and v.max() == v.min():
        return [f"{name}: the magnitude is {v.min():g} all over the mask: it marks no edges (TV everywhere)"]
    return []


def mask_warnings(data: np.ndarray, name: str) -> list[str]:
    """A mask that is not binary: thresholded at > 0 (say so), with a stronger note when it looks like a field."""
    d = np.asarray(data)
    sample = d.ravel()[:: max(1, d.size // 500_000)]
    distinct = np.unique(sample)
    if distinct.size <= 2 and np.all((distinct == 0) | (distinct == distinct.max())):
        return []
    share = float(np.mean(d > 0))
    note = f"{name}: not binary ({distinct.size if distinct.size < 1000 else 'over 1000'} distinct values); using > 0 as the brain ({100 * share:.1f} % of the volume)"
    if np.any(distinct < 0):
        note += "; it holds negative values: is it a field rather than a mask?"
    return [note]
