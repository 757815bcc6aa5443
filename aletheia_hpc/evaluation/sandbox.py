"""Run untrusted, model-written Python in a contained process.

Each program runs in its own fresh interpreter (``python -I``), started by
:mod:`._sandbox_boot`, with these layers (each applied when the machine allows it; what was
applied is reported in :attr:`SandboxResult.isolation`):

wall clock
    The sandbox is the leader of a new session; at the timeout (and after every run) its whole
    process group is killed with SIGKILL.
namespaces (``unshare``)
    A new network namespace (no interface but a downed loopback: nothing is reachable, not even
    127.0.0.1), a new PID namespace with its own /proc (the program sees only its own processes;
    when the sandbox's init dies the kernel kills every process in it, so no descendant survives,
    not even one that called setsid()), ``--kill-child`` ties that init to the group leader.
    As root directly; as another user inside a new user namespace (``--map-root-user``).
Landlock (Linux >= 5.13)
    Writes only beneath the throw-away working directory; reads only beneath the interpreter's and
    the system's directories (so $HOME, tokens and other projects are unreadable); TCP bind and
    connect denied (ABI >= 4); signals to processes outside the sandbox and abstract unix sockets
    denied (ABI >= 6).
unprivileged user
    When the evaluator is root, the program runs as ``nobody`` (uid/gid 65534): RLIMIT_NPROC is
    not enforced for root, and root-owned files are out of its reach. This needs an interpreter
    that ``nobody`` can run; :func:`sandbox_interpreter` probes the project's and the system's.
resource limits
    RLIMIT_CPU (timeout), RLIMIT_AS (memory, 1 GiB default), RLIMIT_NPROC (processes),
    RLIMIT_FSIZE (largest file, which also caps the captured output), RLIMIT_NOFILE, no core files.
scrubbed environment
    Only PATH, LANG/LC_ALL, HOME/TMPDIR (the working directory) are passed; ``-I`` ignores
    PYTHON* variables and the user site; stdin is /dev/null.
throw-away directory
    A fresh temporary directory per run, deleted afterwards; output goes to a file outside it.

Without ``unshare`` (or user namespaces) and without Landlock a program could still reach the
network and, run by a non-root user, signal that user's processes; :func:`isolation_summary`
says which layers this machine provides.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from aletheia_hpc.evaluation import _sandbox_boot as boot

logger = logging.getLogger(__name__)
BOOT_SCRIPT = Path(boot.__file__).resolve()
NOBODY = (65534, 65534)
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
_PROBE_PROGRAM = "import collections, functools, hashlib, heapq, itertools, json, math, re, string\n"


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one run, and which isolation layers to use (all by default)."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    max_processes: int = 16
    max_file_mb: int = 16
    max_open_files: int = 64
    namespaces: bool = True
    landlock: bool = True
    drop_privileges: bool = True


@dataclass
class SandboxResult:
    passed: bool
    status: str  # passed | failed | timeout
    returncode: int | None
    duration_s: float
    output: str = ""  # the tail of stdout+stderr, header and pass marker removed
    isolation: dict = field(default_factory=dict)


def _is_root() -> bool:
    return os.geteuid() == 0


@functools.lru_cache(maxsize=None)
def namespace_prefix() -> tuple[str, ...]:
    """The ``unshare`` command line that works here, most isolating first; () when none does."""
    unshare = shutil.which("unshare") or ("/usr/bin/unshare" if os.path.exists("/usr/bin/unshare") else None)
    if unshare is None:
        return ()
    user = () if _is_root() else ("--user", "--map-root-user")
    for flags in (("--net", "--pid", "--fork", "--kill-child", "--mount-proc"),
                  ("--net", "--pid", "--fork", "--kill-child"),
                  ("--net",)):
        command = (unshare, *user, *flags)
        try:
            done = subprocess.run([*command, "/bin/true"], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  timeout=20, env=_ENV)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return command
    logger.warning("sandbox: no usable 'unshare' (network/PID namespaces); untrusted code keeps the "
                   "network unless Landlock blocks TCP, and setsid() children may outlive a timeout")
    return ()


@functools.lru_cache(maxsize=None)
def sandbox_interpreter(drop_privileges: bool = True) -> tuple[str, bool]:
    """(python executable, whether to drop root to nobody) for sandboxed runs.

    Not root, or dropping not wanted: this interpreter. Root: the first of this interpreter and
    the system's python3 that ``nobody`` can start and import the standard library with; if none
    can, this interpreter without the drop (then RLIMIT_NPROC is not enforced).
    """
    if not (_is_root() and drop_privileges):
        return sys.executable, False
    candidates = [sys.executable]
    for name in ("/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3")):
        if name and os.path.exists(name) and os.path.realpath(name) not in map(os.path.realpath, candidates):
            candidates.append(name)
    for candidate in candidates:
        result = _run(_PROBE_PROGRAM, SandboxLimits(timeout_s=20), candidate, drop=True)
        if result.passed:
            return candidate, True
    logger.warning("sandbox: no interpreter that user 'nobody' can run (tried %s); untrusted code "
                   "runs as root, where RLIMIT_NPROC does not apply", ", ".join(candidates))
    return sys.executable, False


def isolation_summary() -> dict:
    """Which isolation layers this machine gives sandboxed runs."""
    interpreter, drop = sandbox_interpreter(True)
    return {"namespaces": list(namespace_prefix()[1:]), "landlock_abi": boot.landlock_abi(),
            "interpreter": interpreter, "runs_as": "nobody" if drop else f"uid {os.geteuid()}",
            "rlimit_nproc_enforced": drop or not _is_root()}


def run_untrusted(program: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run ``program`` once in the sandbox; passed = it ran to its end without an exception."""
    interpreter, drop = sandbox_interpreter(limits.drop_privileges)
    return _run(program, limits, interpreter, drop)


def run_many(programs: Sequence[str], limits: SandboxLimits = SandboxLimits(), workers: int = 2,
             on_done: Callable[[int, SandboxResult], None] | None = None) -> list[SandboxResult]:
    """Run each program in its own sandbox, ``workers`` at a time; results in input order."""
    sandbox_interpreter(limits.drop_privileges)  # probe once, before the threads race for it
    namespace_prefix()
    results: list[SandboxResult | None] = [None] * len(programs)

    def one(index: int) -> None:
        results[index] = run_untrusted(programs[index], limits)
        if on_done is not None:
            on_done(index, results[index])

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for future in [pool.submit(one, i) for i in range(len(programs))]:
            future.result()
    return results  # type: ignore[return-value]


def _run(program: str, limits: SandboxLimits, interpreter: str, drop: bool) -> SandboxResult:
    base = Path(tempfile.mkdtemp(prefix="aletheia-sandbox-"))
    try:
        return _run_in(base, program, limits, interpreter, drop)
    finally:
        _remove_tree(base)


def _run_in(base: Path, program: str, limits: SandboxLimits, interpreter: str, drop: bool
            ) -> SandboxResult:
    workdir = base / "work"
    workdir.mkdir()
    if drop:  # nobody may pass through base (0711, not list it) to its own working directory
        os.chmod(base, 0o711)
        os.chown(workdir, *NOBODY)
    nonce = secrets.token_hex(16)
    request = {
        "program": program, "nonce": nonce, "workdir": str(workdir),
        "landlock": limits.landlock, "drop_to": list(NOBODY) if drop else None,
        "limits": {"cpu_s": max(1, math.ceil(limits.timeout_s)),
                   "memory_bytes": int(limits.memory_mb) * 2**20,
                   "nproc": int(limits.max_processes),
                   "fsize_bytes": int(limits.max_file_mb) * 2**20,
                   "nofile": int(limits.max_open_files)},
    }
    prefix = namespace_prefix() if limits.namespaces else ()
    command = [*prefix, interpreter, "-I", str(BOOT_SCRIPT)]
    env = {**_ENV, "HOME": str(workdir), "TMPDIR": str(workdir)}
    out_path = base / "output"
    started = time.monotonic()
    timed_out = False
    with open(os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                cwd=workdir, env=env, start_new_session=True, close_fds=True)
        try:
            proc.communicate(json.dumps(request).encode("utf-8"), timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _terminate(proc, pid_namespace="--pid" in prefix)
    duration = time.monotonic() - started
    return _result(out_path, nonce, proc.returncode, duration, timed_out)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def _terminate(proc: subprocess.Popen, pid_namespace: bool) -> None:
    """Kill everything the run left behind and reap the leader.

    With a PID namespace the leader is ``unshare`` and its child is the sandbox's init: killing
    that init first tears the whole namespace down and lets ``unshare`` reap it (instead of
    leaving a zombie to the machine's init). Then the process group goes, whatever is left of it.
    """
    if pid_namespace and proc.poll() is None:
        for child in _children(proc.pid):
            try:
                os.kill(child, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
    _kill_group(proc.pid)
    proc.wait()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _result(out_path: Path, nonce: str, returncode: int | None, duration: float, timed_out: bool
            ) -> SandboxResult:
    with open(out_path, "rb") as handle:
        head = handle.read(4096).decode("utf-8", "replace")
        size = handle.seek(0, os.SEEK_END)
        handle.seek(max(0, size - 8192))
        tail = handle.read().decode("utf-8", "replace")
    isolation: dict = {}
    if head.startswith(boot.HEADER):
        first = head.split("\n", 1)[0]
        try:
            isolation = json.loads(first[len(boot.HEADER):])
        except ValueError:
            isolation = {}
        if size <= 8192:
            tail = tail.split("\n", 1)[1] if "\n" in tail else ""
    marker = boot.PASS_MARKER + nonce
    lines = tail.rstrip("\n").split("\n")
    passed = not timed_out and returncode == 0 and lines[-1] == marker
    if passed:
        tail = "\n".join(lines[:-1])
    status = "passed" if passed else ("timeout" if timed_out else "failed")
    return SandboxResult(passed=passed, status=status, returncode=returncode, duration_s=duration,
                         output=tail.strip("\n")[-4000:], isolation=isolation)


def _remove_tree(path: Path) -> None:
    def fix(function, failed, _exc):  # a program may leave read-only dirs behind
        try:
            os.chmod(os.path.dirname(failed), 0o700)
            os.chmod(failed, 0o700)
            function(failed)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=fix)
    else:
        shutil.rmtree(path, onerror=fix)


def as_dict(result: SandboxResult) -> dict:
    return asdict(result)
