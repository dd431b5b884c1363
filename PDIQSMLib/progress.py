"""Progress on stderr: a bar for people, or one parseable line per step for a GUI.

Line format (stable, read by the Slicer module): ``PROGRESS <done>/<total> <label>``; free-text
status lines start with ``STATUS ``. A long loop also says how long it will take: from its second step
on, the time left at the pace so far (``STATUS <label>: about N s left``, at most every ETA_EVERY_S
seconds; on a bar, after the count); ``up to N s left`` for a loop that may stop before its count (MEDI and PDI-VI
stop when they have converged), where the count is only a bound.
"""

from __future__ import annotations

import re
import sys
import time
from typing import Callable, TextIO

LINE = re.compile(r"^PROGRESS (\d+)/(\d+) (\S+)$")
TIME_LEFT = re.compile(r"^(\S+): ((?:about|up to) \d+ (?:s|min) left)$")  # a STATUS line's text from ``eta_text``
StepFn = Callable[[int, int], None]
ETA_EVERY_S = 5.0


def eta_text(elapsed_s: float, done: int, total: int, base: int = 0, bound: bool = False) -> str | None:
    """'about N s left' (or min) at the pace so far, once a step is done and while some are left.

    ``base`` is the count the loop started from (a resumed training run starts at its checkpoint's
    step): only the steps done since then set the pace. ``bound``: the loop may stop before ``total``
    (it stops when converged), so the time is an upper bound: 'up to N s left'.
    """
    if done - base < 1 or done >= total or elapsed_s <= 0:
        return None
    left = elapsed_s / (done - base) * (total - done)
    word = "up to" if bound else "about"
    return f"{word} {left:.0f} s left" if left < 120 else f"{word} {left / 60:.0f} min left"


class Progress:
    """Reports loops as ``mode``: 'bar', 'lines', 'none', or 'auto' (bar on a terminal, else lines)."""

    def __init__(self, mode: str = "auto", stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        if mode not in ("bar", "lines", "none"):
            raise ValueError(f"unknown progress mode {mode!r}")
        self.mode = mode

    def task(self, label: str, clock: Callable[[], float] = time.monotonic, may_stop_early: bool = False) -> StepFn:
        """A callback ``(done, total)`` for one named loop; the loop starts at the first call. ``may_stop_early``:
        ``total`` is the most steps the loop will take (the time left is then said as an upper bound)."""
        start = clock()
        said = [start]  # when the time left was last written
        base: list[int] = []  # the count before the first call (a resumed loop does not start at 0)

        def step(done: int, total: int) -> None:
            now = clock()
            if not base:
                base.append(max(done - 1, 0))
            eta = eta_text(now - start, done, total, base[0], may_stop_early)
            if self.mode == "lines":
                self.stream.write(f"PROGRESS {done}/{total} {label}\n")
                if eta and now - said[0] >= ETA_EVERY_S:
                    self.stream.write(f"STATUS {label}: {eta}\n")
                    said[0] = now
            elif self.mode == "bar":
                width = 30
                filled = int(width * done / max(total, 1))
                end = "\n" if done >= total else ""
                tail = f" {eta}" if eta else ""
                self.stream.write(f"\r{label:>10} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}{tail:<22}{end}")
            self.stream.flush()
        return step

    def status(self, text: str) -> None:
        if self.mode == "lines":
            self.stream.write(f"STATUS {text}\n")
        elif self.mode == "bar":
            self.stream.write(f"{text}\n")
        self.stream.flush()


def parse_line(line: str) -> tuple[int, int, str] | None:
    """(done, total, label) from a PROGRESS line, else None."""
    m = LINE.match(line.strip())
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None
