"""A run's outputs as one set: checked before the work, staged, flushed, published together or not at all.

Every file of a run (maps, run record, tables) is written first under a hidden staging folder inside
the output folder (the same file system, so the final renames are atomic), flushed to disk, and only
then renamed into place, the run record last: the record's presence marks a complete set, and a
reader sees either what was there before or the whole new set. When anything fails, or the run is
interrupted (SIGINT, SIGTERM: blocked while the renames run), the staging folder is removed and
nothing that was there before has changed.

Replacing existing outputs needs ``overwrite``. Files of the same set that this run does not produce
(for example a standard-deviation map left by an earlier run under the same names) are removed with
the replacement, so that no file looks like this run's when it is not.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import numpy as np

from .errors import InputError
from .io import Volume, save_volume, write_json_atomic

STAGING_PREFIX = ".pdiqsm-staging-"


def _fsync(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # some file systems do not open folders; the data files were flushed
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _SignalsBlocked:
    """SIGINT and SIGTERM wait (on the main thread, where Python handles them) while the set is renamed."""

    def __enter__(self):
        self.blocked = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
        if self.blocked:
            self.old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        return self

    def __exit__(self, *exc):
        if self.blocked:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.old)
        return False


class OutputSet:
    """The files of one run, by role (``{"mean": path, "std": path, "record": path, ...}``).

    ``check()`` before the work (fails fast: unwritable folder, an input in the way, existing outputs
    without ``overwrite``); then, inside ``with outputs:``, ``volume``/``json`` stage files and
    ``publish()`` puts them in place. Leaving the block without ``publish()`` discards the stage.
    """

    def __init__(self, paths: dict[str, Path], protect=(), overwrite: bool = False, last: str = "record") -> None:
        self.paths = {k: Path(v) for k, v in paths.items()}
        folders = {p.parent for p in self.paths.values()}
        if len(folders) != 1:
            raise ValueError(f"an output set lives in one folder, not {sorted(map(str, folders))}")
        self.folder = folders.pop()
        self.protect = [Path(p).resolve() for p in protect if p is not None]
        self.overwrite = overwrite
        self.last = last
        self.staged: dict[str, Path] = {}
        self.stage: Path | None = None
        self.created: list[Path] = []  # folders check() made, deepest first: a run that publishes nothing removes them
        self.published = False

    # -- before the work --------------------------------------------------------------------------
    def check(self) -> None:
        for p in self.paths.values():
            if p.resolve() in self.protect:
                raise InputError(str(p), "output would overwrite an input file; choose another --out-dir")
        folder = self.folder
        if folder.exists() and not folder.is_dir():
            raise InputError(str(folder), "the output folder is a file; choose another --out-dir")
        missing = [f for f in (folder, *folder.parents) if not f.exists()]
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self.created = self.created or missing
        except OSError as exc:
            raise InputError(str(folder), f"cannot create the output folder ({exc.strerror or exc})") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise InputError(str(folder), "the output folder is not writable; choose another --out-dir")
        existing = self.existing()
        if existing and not self.overwrite:
            what = "it" if len(existing) == 1 else f"these {len(existing)} files"
            raise InputError(str(existing[0]), f"exists (an earlier run's output); pass --overwrite to replace {what}, "
                                               "or choose another --out-dir")

    def existing(self) -> list[Path]:
        return [p for p in self.paths.values() if p.exists() or p.is_symlink()]

    def abandon(self) -> None:
        """After a run that published nothing: remove the folders ``check()`` made while they are empty (a failed
        subject leaves no empty output folder that looks like a result's)."""
        if self.published:
            return
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:  # not empty (another run's files) or gone: stop there
                break
        self.created = []

    # -- staging ----------------------------------------------------------------------------------
    def __enter__(self) -> "OutputSet":
        self.check()
        self.stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.folder))
        self.staged = {}
        return self

    def __exit__(self, *exc) -> bool:
        if self.stage is not None:
            shutil.rmtree(self.stage, ignore_errors=True)
            self.stage = None
        self.abandon()
        return False

    def _target(self, role: str) -> Path:
        if self.stage is None:
            raise RuntimeError("stage files inside 'with OutputSet(...)'")
        if role not in self.paths:
            raise KeyError(f"no output role {role!r}; roles: {', '.join(self.paths)}")
        return self.stage / self.paths[role].name

    def file(self, role: str, write) -> Path:
        """Stage any file: ``write(target)`` writes it and returns its path."""
        return self._write(role, write)

    def _write(self, role: str, write) -> Path:
        target = self._target(role)
        try:
            self.staged[role] = write(target)
        except OSError as exc:  # full disk, file size limit, quota: name the output, not the staging file
            raise InputError(str(self.paths[role]), f"cannot be written ({exc.strerror or exc}); nothing of this "
                                                    "run was published") from None
        return self.paths[role]

    def volume(self, role: str, data: np.ndarray, like: Volume, description: str) -> Path:
        return self._write(role, lambda target: save_volume(target, data, like, description))

    def json(self, role: str, record: dict) -> Path:
        return self._write(role, lambda target: write_json_atomic(target, record))

    def text(self, role: str, text: str) -> Path:
        def write(target: Path) -> Path:
            target.write_text(text)
            return target
        return self._write(role, write)

    def publish(self) -> list[Path]:
        """Rename the staged files into place (the record last) and remove what the set no longer holds.

        Earlier files under these names are moved into the stage first and put back if a rename fails,
        so a failure leaves the folder as it was."""
        if self.stage is None:
            raise RuntimeError("publish inside 'with OutputSet(...)'")
        if self.last in self.paths and self.last not in self.staged:
            raise RuntimeError(f"the set has no {self.last!r}: nothing published")
        if not self.overwrite and self.existing():  # appeared while this run worked
            raise InputError(str(self.existing()[0]), "appeared while this run worked (another run writing here?); "
                                                      "pass --overwrite to replace it")
        for staged in self.staged.values():
            _fsync(staged)
        order = sorted(self.staged, key=lambda role: role == self.last)
        old = self.stage / ".replaced"
        old.mkdir()
        moved_aside: list[tuple[Path, Path]] = []
        published: list[Path] = []
        with _SignalsBlocked():
            try:
                for role, final in self.paths.items():
                    if final.exists() or final.is_symlink():
                        aside = old / f"{role}-{final.name}"
                        os.replace(final, aside)
                        moved_aside.append((aside, final))
                for role in order:
                    os.replace(self.staged[role], self.paths[role])
                    published.append(self.paths[role])
                _fsync(self.folder, directory=True)
            except BaseException:
                for p in published:
                    p.unlink(missing_ok=True)
                for aside, final in moved_aside:
                    os.replace(aside, final)
                raise
        self.published = True
        return [self.paths[role] for role in order]


def leftover_stages(folder: Path) -> list[Path]:
    """Staging folders in ``folder`` (a run killed with SIGKILL or a power cut leaves one; nothing else can)."""
    return sorted(Path(folder).glob(STAGING_PREFIX + "*"))
