"""The two file primitives every writer shares: an atomic write and an exclusive file lock."""

from __future__ import annotations

import fcntl
import os
import tempfile
from contextlib import contextmanager
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
