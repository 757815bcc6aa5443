"""The generic verified cache (aletheia_hpc/verified_cache.py) on real files and real processes; the
GGUF conversion built on it is tested in test_gguf_cache.py."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from aletheia_hpc import verified_cache as vc
from tests.conftest import race_processes

KEY = "abc123-float32"


def builder(calls: list, payload: bytes = b"weights " * 512, extra: dict | None = None):
    """A build that writes two files (one in a subdirectory) and records that it ran."""
    def build(tmp: Path) -> dict:
        calls.append(tmp)
        (tmp / "weights.bin").write_bytes(payload)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text('{"hidden": 576}')
        return extra if extra is not None else {"source": {"sha256": "abc123"}}
    return build


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if ".tmp-" in p.name or ".stale-" in p.name)


def test_first_use_builds_and_publishes_a_manifest_of_every_file(tmp_path):
    calls = []
    entry = vc.get_or_build(tmp_path, KEY, builder(calls))
    assert entry.path == tmp_path / KEY and entry.built_because == "directory missing" and len(calls) == 1
    manifest = vc.read_manifest(entry.path)
    assert manifest == entry.manifest and manifest["source"] == {"sha256": "abc123"}
    assert set(manifest["files"]) == {"weights.bin", "sub/config.json"}
    for name, record in manifest["files"].items():
        assert record["sha256"] == vc.sha256_file(entry.path / name)
        assert record["size"] == (entry.path / name).stat().st_size
    assert vc.verify_entry(entry.path) is None and leftovers(tmp_path) == []
    assert (tmp_path / f".{KEY}.lock").exists()


def test_a_valid_entry_is_reused_untouched(tmp_path):
    calls = []
    first = vc.get_or_build(tmp_path, KEY, builder(calls))
    before = (first.path / "weights.bin").stat()
    again = vc.get_or_build(tmp_path, KEY, builder(calls))
    assert again.built_because is None and len(calls) == 1 and again.manifest == first.manifest
    after = (again.path / "weights.bin").stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)


def _truncate(entry: Path) -> str:
    with open(entry / "weights.bin", "r+b") as handle:
        handle.truncate(100)
    return "weights.bin has 100 bytes"


def _flip_byte(entry: Path) -> str:
    data = bytearray((entry / "weights.bin").read_bytes())
    data[7] ^= 0xFF
    (entry / "weights.bin").write_bytes(bytes(data))
    return "weights.bin checksum mismatch"


def _edit_manifest(entry: Path) -> str:
    manifest = vc.read_manifest(entry)
    manifest["source"]["sha256"] = "forged"
    (entry / vc.MANIFEST_NAME).write_text(json.dumps(manifest))
    return "manifest digest mismatch"


def _add_file(entry: Path) -> str:
    (entry / "sub" / "stray.txt").write_text("not ours")
    return "unexpected files: sub/stray.txt"


def _delete_file(entry: Path) -> str:
    (entry / "sub" / "config.json").unlink()
    return "sub/config.json missing"


def _delete_manifest(entry: Path) -> str:
    (entry / vc.MANIFEST_NAME).unlink()
    return "manifest missing"


def _garble_manifest(entry: Path) -> str:
    (entry / vc.MANIFEST_NAME).write_text('{"format": 1, "files": ')
    return "manifest unreadable"


DAMAGES = {f.__name__.lstrip("_"): f for f in (_truncate, _flip_byte, _edit_manifest, _add_file, _delete_file,
                                               _delete_manifest, _garble_manifest)}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_entry_is_detected_and_rebuilt(tmp_path, damage, caplog):
    calls = []
    first = vc.get_or_build(tmp_path, KEY, builder(calls))
    expected = DAMAGES[damage](first.path)
    problem = vc.verify_entry(first.path)
    assert problem is not None and problem.startswith(expected), problem
    with caplog.at_level(logging.WARNING, logger=vc.logger.name):
        again = vc.get_or_build(tmp_path, KEY, builder(calls))
    assert len(calls) == 2 and again.built_because.startswith(expected)
    assert [r.getMessage() for r in caplog.records if expected in r.getMessage()], caplog.records
    assert vc.verify_entry(again.path) is None and leftovers(tmp_path) == []


def test_the_callers_check_rejects_an_entry_built_for_something_else(tmp_path):
    calls = []
    vc.get_or_build(tmp_path, KEY, builder(calls))

    def check(manifest):
        return None if manifest["source"]["sha256"] == "def456" else "built from another source"

    assert vc.verify_entry(tmp_path / KEY, check=check) == "built from another source"
    entry = vc.get_or_build(tmp_path, KEY, builder(calls, extra={"source": {"sha256": "def456"}}), check=check)
    assert len(calls) == 2 and entry.built_because == "built from another source"
    assert vc.verify_entry(entry.path, check=check) is None


def test_fast_verify_trusts_large_files_by_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setattr(vc, "FAST_VERIFY_MIN_BYTES", 1024)  # weights.bin (4 KiB) counts as large
    entry = vc.get_or_build(tmp_path, KEY, builder([]))
    weights = entry.path / "weights.bin"
    st = weights.stat()
    _flip_byte(entry.path)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # the one edit fast mode cannot see
    assert vc.verify_entry(entry.path, verify="fast") is None
    assert vc.verify_entry(entry.path, verify="full") == "weights.bin checksum mismatch"
    with pytest.raises(ValueError, match="verify must be 'full' or 'fast'"):
        vc.verify_entry(entry.path, verify="quick")


def test_a_failed_build_publishes_nothing_and_a_killed_ones_leftover_is_never_used(tmp_path):
    def broken(tmp: Path) -> dict:
        (tmp / "weights.bin").write_bytes(b"half")
        raise RuntimeError("source changed while building")

    with pytest.raises(RuntimeError, match="source changed"):
        vc.get_or_build(tmp_path, KEY, broken)
    assert not (tmp_path / KEY).exists() and leftovers(tmp_path) == []

    calls = []
    good = vc.get_or_build(tmp_path / "other", KEY, builder(calls))
    killed = tmp_path / f".{KEY}.tmp-killed"  # as a build killed after writing everything leaves it
    os.rename(good.path, killed)
    entry = vc.get_or_build(tmp_path, KEY, builder(calls))
    assert len(calls) == 2 and entry.path == tmp_path / KEY and leftovers(tmp_path) == []


_CHILD = r"""
import json, os, sys, time
from pathlib import Path
from aletheia_hpc import verified_cache as vc
root, ready, go = sys.argv[1:4]
def build(tmp):
    time.sleep(1.0)  # long enough for the other process to find the lock taken
    (tmp / "weights.bin").write_bytes(os.urandom(4096))
    return {"builder_pid": os.getpid()}
Path(ready).touch()
while not os.path.exists(go):
    time.sleep(0.002)
entry = vc.get_or_build(Path(root), "k", build)
print(json.dumps({"built": entry.built_because is not None, "inode": entry.path.stat().st_ino,
                  "builder": entry.manifest["builder_pid"]}))
"""


def test_processes_asking_at_once_build_once(tmp_path):
    n = 3
    results = race_processes(_CHILD, [str(tmp_path / "cache")], tmp_path, n, start_timeout=60, run_timeout=60)
    assert sorted(r["built"] for r in results) == [False] * (n - 1) + [True]
    assert len({r["inode"] for r in results}) == 1 and len({r["builder"] for r in results}) == 1
    assert leftovers(tmp_path / "cache") == []
