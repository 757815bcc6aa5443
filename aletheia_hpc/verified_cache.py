"""A verified on-disk cache: directories built once under a key, published whole, checked on every use.

Layout, under the cache's ``root``::

    <key>/                  one entry: the files its build wrote, plus manifest.json
    .<key>.lock             flock(2) lock (files.file_lock) serialising check-and-build for that key
    .<key>.tmp-*            a build in progress (or the leftover of a killed one)

``manifest.json`` holds ``format``, the size, SHA-256 and mtime_ns of every file of the entry, what
the build adds (``build`` returns it), and a ``digest`` of all of it. An entry is valid when its
manifest parses, its digest matches, the caller's ``check`` finds nothing wrong, no unlisted file sits
beside the listed ones, and every listed file has its recorded size and SHA-256. ``verify="fast"``
(for slow shared file systems) trusts a file above FAST_VERIFY_MIN_BYTES whose size and mtime_ns
equal the manifest's without hashing it; it misses only an in-place edit that keeps the size and
restores the mtime.

Atomicity and concurrency: a build writes into a temp directory beside the entry, which is renamed
into place (an invalid old entry is first renamed aside, then removed), so a half-built entry is
never at its path. The per-key lock is held around check-and-build, so N processes asking at once
build once and all get the same entry. flock works on local file systems and NFSv4; Lustre needs the
``flock`` mount option.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from aletheia_hpc.files import atomic_write, file_lock

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
# Files bigger than this may be trusted by size + mtime_ns in verify="fast" mode.
FAST_VERIFY_MIN_BYTES = 64 << 20
_CHUNK = 4 << 20

_sha_memo: dict[tuple, str] = {}


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 4 MiB chunks (never the whole file in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def stat_key(path: Path) -> tuple:
    """What changes when a file is replaced or rewritten: device, inode, size, mtime_ns, ctime_ns."""
    st = Path(path).stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def memoised_sha256(path: Path) -> str:
    """``sha256_file``, memoised in-process by the file's path and ``stat_key`` (for a source file
    that names a cache key and is hashed on every use).

    As in git's "racy" rule, a file modified in the last few seconds is not memoised: timestamps are
    coarse (a kernel tick), so an in-place rewrite right after hashing could keep the same stat.
    """
    path = Path(path)
    st = path.stat()
    key = (str(path), *stat_key(path))
    if key in _sha_memo:
        return _sha_memo[key]
    sha = sha256_file(path)
    if time.time() - max(st.st_mtime, st.st_ctime) > 3.0:
        _sha_memo[key] = sha
    return sha


def _body_digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_manifest(entry: Path) -> dict:
    """The manifest of an entry directory (raises on a missing or unreadable one)."""
    return json.loads((Path(entry) / MANIFEST_NAME).read_text())


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _apply_umask(root: Path) -> None:
    """mkdtemp makes 0700 and builders may write 0600: open up to the umask for shared caches."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for path in root.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _write_manifest(entry: Path, extra: dict) -> dict:
    """Record every file of ``entry`` (fsynced first) and ``extra`` in its manifest; returns it."""
    files = {}
    for path in sorted(p for p in entry.rglob("*") if p.is_file()):
        _fsync_path(path)
        st = path.stat()
        files[path.relative_to(entry).as_posix()] = {"size": st.st_size, "sha256": sha256_file(path),
                                                     "mtime_ns": st.st_mtime_ns}
    body = {"format": MANIFEST_FORMAT, **extra, "files": files}
    manifest = dict(body, digest=_body_digest(body))
    atomic_write(entry / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def verify_entry(entry: Path, *, check: Callable[[dict], str | None] | None = None,
                 verify: str = "full") -> str | None:
    """Why ``entry`` is not a valid cache entry, or None when it is (module docstring); ``check``
    says what is wrong with a manifest whose digest matched, in the caller's terms."""
    if verify not in ("full", "fast"):
        raise ValueError(f"verify must be 'full' or 'fast', not {verify!r}")
    try:
        return _verify(Path(entry), check, verify)
    except (KeyError, TypeError, AttributeError) as error:
        return f"manifest incomplete ({type(error).__name__}: {error})"


def _verify(entry: Path, check, verify: str) -> str | None:
    if not entry.is_dir():
        return "directory missing"
    try:
        manifest = read_manifest(entry)
    except FileNotFoundError:
        return "manifest missing"
    except (OSError, ValueError) as error:
        return f"manifest unreadable: {error}"
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return "manifest has an unknown format"
    body = {k: v for k, v in manifest.items() if k != "digest"}
    if manifest.get("digest") != _body_digest(body):
        return "manifest digest mismatch (manifest edited or damaged)"
    if check is not None and (problem := check(manifest)):
        return problem
    files: dict = manifest.get("files") or {}
    present = {p.relative_to(entry).as_posix() for p in entry.rglob("*") if not p.is_dir()}
    unexpected = sorted(n for n in present - set(files) - {MANIFEST_NAME}
                        if not Path(n).name.startswith(".nfs"))
    if unexpected:
        return f"unexpected files: {', '.join(unexpected)}"
    for name, record in files.items():
        path = entry / name
        if path.is_symlink() or not path.is_file():
            return f"{name} missing"
        st = path.stat()
        if st.st_size != record["size"]:
            return f"{name} has {st.st_size} bytes, manifest says {record['size']}"
        if (verify == "fast" and st.st_size >= FAST_VERIFY_MIN_BYTES
                and st.st_mtime_ns == record["mtime_ns"]):
            continue
        if sha256_file(path) != record["sha256"]:
            return f"{name} checksum mismatch"
    return None


@dataclass
class Entry:
    path: Path
    manifest: dict
    built_because: str | None  # why it was built (verify_entry's answer), None when it was valid already
    seconds: float  # of the build and its publication, or of the check when nothing was built


def get_or_build(root: Path, key: str, build: Callable[[Path], dict], *,
                 check: Callable[[dict], str | None] | None = None, verify: str = "full",
                 log: logging.Logger = logger) -> Entry:
    """The valid entry ``root/key``, built first when it is missing or invalid.

    Under the key's lock: leftovers of killed builds are removed, the entry is verified
    (``verify_entry`` with ``check``); if it is not valid, ``build(tmp)`` writes the entry's files into
    a fresh temp directory and returns what the manifest records besides them; the manifest is
    written and the directory renamed into place. ``log`` gets the waiting and rebuilding messages.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target = root / key
    lock = root / f".{key}.lock"
    with file_lock(lock, on_wait=lambda _holder: log.info(
            "waiting for the lock %s (another process is checking or building this entry)", lock)):
        # leftovers of a killed build: every writer of these names holds this lock, so none is live
        for leftover in [*root.glob(f".{key}.tmp-*"), *root.glob(f".{key}.stale-*")]:
            shutil.rmtree(leftover, ignore_errors=True)
        started = time.perf_counter()
        problem = verify_entry(target, check=check, verify=verify)
        if problem is None:
            log.debug("reusing %s (verified in %.2f s)", target, time.perf_counter() - started)
            return Entry(target, read_manifest(target), None, time.perf_counter() - started)
        if target.exists() or target.is_symlink():
            log.warning("cache entry %s is invalid (%s); rebuilding it", target, problem)
        started = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
        stale = None
        try:
            manifest = _write_manifest(tmp, build(tmp))
            _apply_umask(tmp)
            if target.exists() or target.is_symlink():
                stale = root / f".{key}.stale-{uuid.uuid4().hex}"
                os.rename(target, stale)
            os.rename(tmp, target)
            _fsync_path(root, directory=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
        return Entry(target, manifest, problem, time.perf_counter() - started)
