"""The file primitives every writer shares: an atomic write, an exclusive file lock, and the cell lock."""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator


def atomic_write(path: Path, data: str | bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old file, the new one, or none: a temporary
    file beside it, flushed (and fsynced), then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LockHeld(RuntimeError):
    """Another process holds the lock; ``holder`` is what it wrote into the lock file."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is locked by another process ({holder or 'holder unknown'})")
        self.path, self.holder = path, holder


@contextmanager
def file_lock(path: Path, *, wait: bool = True, holder: str = "", on_wait=None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if absent) for the ``with`` block; the kernel
    drops it if the process dies. ``wait=False`` raises LockHeld instead of waiting; ``holder`` is
    written into the file for whoever finds it taken; ``on_wait(holder)`` is called once before
    waiting."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            current = handle.read().strip()
            if not wait:
                raise LockHeld(path, current) from None
            if on_wait:
                on_wait(current)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            if holder:
                handle.seek(0)
                handle.truncate()
                handle.write(holder)
                handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def lock_holder(path: Path) -> str | None:
    """What the holder of the lock on ``path`` wrote, or None when nobody holds it."""
    path = Path(path)
    if not path.exists():
        return None
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip()
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None


# Every writer of a cell (run-cell, the local dispatcher's workers, SLURM array tasks: all of them go
# through worker.cell.run_cell) holds this lock in the cell's directory while it trains and writes the row.
CELL_LOCK_FILE = "cell.lock"


class CellBusy(RuntimeError):
    """Another process runs the cell; the message names it (pid, host, since when, which job)."""


def _lock_owner(holder: str) -> str:
    try:
        other = json.loads(holder)
        return f"{other['by']} (pid {other['pid']} on host {other['host']}, started {other['started_at']})"
    except (ValueError, KeyError, TypeError):
        return "a process that left no details"


@contextmanager
def cell_lock(cell_dir: Path, holder: dict, *, wait: bool = False, on_wait=None) -> Iterator[None]:
    """Hold the lock of the cell in ``cell_dir`` for the ``with`` block (``holder``: what this process
    writes for the next one to find, JSON: by, pid, host, started_at). Taken: raise CellBusy naming the
    holder, or with ``wait`` call ``on_wait(text naming it)`` and wait."""
    path, cell = Path(cell_dir) / CELL_LOCK_FILE, Path(cell_dir).name
    busy = lambda current: f"cell {cell} is being run by {_lock_owner(current)}"
    stack = ExitStack()
    try:
        stack.enter_context(file_lock(path, wait=wait, holder=json.dumps(holder),
                                      on_wait=lambda current: on_wait and on_wait(busy(current))))
    except LockHeld as exc:
        raise CellBusy(f"{busy(exc.holder)}; wait for it to end (or stop it) rather than train the cell "
                       "twice") from None
    with stack:
        yield


def directory_problem(path: Path, *, write: bool) -> str | None:
    """Why ``path`` cannot hold results (read them, or with ``write`` also write them, creating the
    directory later); None when it can. It creates nothing: a refused launch leaves no trace, so the
    write is tried in the nearest directory that exists. A write is tried, not asked of os.access:
    root passes that test on read-only file systems too."""
    path = Path(path)
    known = next(p for p in (path, *path.parents) if p.exists())
    if not known.is_dir():
        return f"{known} is a file, not a directory"
    if write:
        try:
            with tempfile.TemporaryFile(dir=known):
                pass
        except OSError as exc:
            return f"cannot write in {known} ({exc.strerror})"
    return None
