"""Step-size schedules shared by training and PDI-VI."""

from __future__ import annotations

import math


def cosine(start: float, end: float, progress: float) -> float:
    """Half a cosine from ``start`` (``progress`` 0) to ``end`` (``progress`` >= 1); ``progress`` is clipped to [0, 1].
    Callers decide when there is no decay at all (training: ``lr_final`` 0; PDI-VI: ``lr_final`` None)."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
