"""Progress on stderr: a bar for people, or one parseable line per step for a GUI.

Line format (stable, read by the Slicer module): ``PROGRESS <done>/<total> <label>``; free-text
status lines start with ``STATUS ``.
"""

from __future__ import annotations

import re
import sys
from typing import Callable, TextIO

LINE = re.compile(r"^PROGRESS (\d+)/(\d+) (\S+)$")
StepFn = Callable[[int, int], None]


class Progress:
    """Reports loops as ``mode``: 'bar', 'lines', 'none', or 'auto' (bar on a terminal, else lines)."""

    def __init__(self, mode: str = "auto", stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        if mode not in ("bar", "lines", "none"):
            raise ValueError(f"unknown progress mode {mode!r}")
        self.mode = mode

    def task(self, label: str) -> StepFn:
        """A callback ``(done, total)`` for one named loop."""
        def step(done: int, total: int) -> None:
            if self.mode == "lines":
                self.stream.write(f"PROGRESS {done}/{total} {label}\n")
            elif self.mode == "bar":
                width = 30
                filled = int(width * done / max(total, 1))
                end = "\n" if done >= total else ""
                self.stream.write(f"\r{label:>10} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}{end}")
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
