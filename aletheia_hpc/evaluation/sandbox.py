"""Run untrusted, model-written Python in a contained process, and judge it from outside.

Each program runs in its own fresh interpreter (``python -I -S``: the standard library only),
started by :mod:`._sandbox_boot`. Two uses:

:func:`judge_function` (HumanEval)
    The candidate's code is loaded in the sandbox, which then only answers calls of its entry
    point over a pipe (arguments and results as tagged JSON, decoded into plain built-in values,
    never pickle; each reply must carry its call's random id). The tests run in the evaluator's
    process and decide the verdict; the candidate never sees them, their expected answers or any
    pass token, so exiting early, tracing, reading frames or rebinding ``os._exit`` cannot make a
    wrong answer pass. A reply is capped at 64 KiB and decoded in time linear in its size
    (:func:`._sandbox_boot.decode_message`), so no reply stalls the other problems' threads.
:func:`run_untrusted` / :func:`run_many`
    Run a whole program; ``passed`` means it ran to its end without an exception, which is the
    program's own claim (used by the containment tests, not for verdicts).

Backends, the first that works on this machine (recorded in every result's ``isolation``).
Both namespace backends give the run the same root (:func:`root_layout`): a tmpfs holding
read-only binds of /usr (and /bin, /lib, ...) and the interpreter's installation, /dev with null,
zero and urandom only, a fresh /proc and a size-capped tmpfs /tmp (the working directory: the
total disk cap). The host's /tmp, /run, /dev, home directories and the project checkout do not
exist in it, so no host socket, file or directory outside those binds can be named, watched or
stat'ed.

``bwrap``
    bubblewrap (``apt-get install bubblewrap``) builds that root, with new user, network, PID,
    IPC, UTS and cgroup namespaces; ``--die-with-parent``. Run as ``nobody`` when the evaluator
    is root.
``unshare``
    util-linux ``unshare``: network, PID (own /proc), IPC and mount namespaces (with
    ``--user`` when the evaluator is not root); the boot script builds that root and
    ``pivot_root``s into it; as root the program is switched to ``nobody``.
``none``
    No namespaces (only Landlock, seccomp and the limits below hold; the host's paths stay
    visible to stat); seccomp also refuses setsid/setpgid, so killing the run's process group
    kills everything it started.

In every backend the boot script adds Landlock (reads only beneath system and interpreter
directories, writes only beneath the working directory, no TCP, no signals or abstract sockets
outside), a seccomp filter (sockets and socket pairs of AF_INET/AF_INET6 only, no new
namespaces, no mounts, no inotify/fanotify, no io_uring, kernel keyrings, fallocate or foreign-ABI
syscalls) and resource limits (CPU seconds, address space, file size, open files). Where
cgroups can be created (root on cgroup v1, or a delegated cgroup v2 subtree) each run gets its
own: memory (tmpfs included) of all its processes together, a process count (pids.max) and a
CPU share (cpu.max), for that run alone; where no pids cgroup exists RLIMIT_NPROC stands in,
which counts the processes of the run's uid: in bubblewrap's user namespace those of that
namespace, on the other backends every process of that uid on the machine. The program's stdout and stderr go
through a pipe the evaluator drains and caps (no host file). Environment: only PATH,
LANG/LC_ALL, HOME/TMPDIR; stdin is /dev/null. docs/sandbox.md has the threat model and a table
of what each backend gives.

When the evaluator is root and no interpreter can be run as ``nobody``, nothing runs:
:class:`SandboxUnavailable` names the fix. ``SandboxLimits(drop_privileges=False)`` runs as the
evaluator's own user and exists for the layer tests only.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import secrets
import select
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from aletheia_hpc.evaluation import _sandbox_boot as boot

logger = logging.getLogger(__name__)
BOOT_SCRIPT = Path(boot.__file__).resolve()
NOBODY = (65534, 65534)
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
_PROBE_PROGRAM = "import collections, functools, hashlib, heapq, itertools, json, math, re, string\n"
# what the evaluator keeps of a run's stdout+stderr, and where it stops reading (the run's next
# write then fails with EPIPE): the output never touches the host's disk
_OUTPUT_HEAD, _OUTPUT_TAIL, _MAX_OUTPUT_BYTES = 4096, 8192, 2**20
_BOOT_INSIDE = "/sandbox/boot.py"

# What ``eval.sandbox.require`` may ask for; each name is a property of a finished run's isolation.
FEATURES = {
    "bwrap": "the bubblewrap backend ran",
    "net": "a network namespace (no interface reachable)",
    "pid": "a PID namespace (no process outside visible or signalled; nothing outlives the run)",
    "mount": "a root of the run's own: no host /tmp, /run, /dev or checkout (no host socket or file there is visible)",
    "landlock": "a Landlock ruleset (reads and writes confined, no TCP)",
    "seccomp": ("a seccomp filter refusing sockets other than AF_INET/AF_INET6 (AF_UNIX, AF_VSOCK, ...), "
                "new namespaces, mounts and inotify/fanotify"),
    "unprivileged": "the program ran as a non-root user",
    "memory_total": "a cgroup caps the memory of all the run's processes together",
    "disk_total": "a size-capped tmpfs caps everything the run writes",
}
FIXES = {
    "bwrap": "install bubblewrap (apt-get install bubblewrap) and allow unprivileged user namespaces",
    "net": "install util-linux unshare or bubblewrap and allow (user) namespaces",
    "pid": "install util-linux unshare or bubblewrap and allow (user) namespaces",
    "mount": "install bubblewrap (apt-get install bubblewrap), or util-linux unshare (>= 2.23, --mount-proc)",
    "landlock": "use a kernel >= 5.13 with Landlock enabled (lsm=...,landlock)",
    "seccomp": "use an x86_64 or aarch64 Linux kernel with seccomp filters",
    "unprivileged": "run as an ordinary user, or as root with a python3 that user nobody can run",
    "memory_total": "run as root (cgroup v1) or in a delegated cgroup v2 subtree with the memory controller",
    "disk_total": "install bubblewrap (apt-get install bubblewrap), or util-linux unshare (>= 2.23, --mount-proc)",
}


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot run here as required; the message names the fix."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one run, and which isolation layers to use (all by default)."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    max_processes: int = 16  # this run's (pids cgroup), else every process of its uid (RLIMIT_NPROC)
    max_file_mb: int = 16
    disk_mb: int = 64  # the whole working directory (the private root's /tmp)
    cpus: float = 1.0  # the run's CPU share, all its processes together (cpu cgroup)
    max_open_files: int = 64
    namespaces: bool = True
    bwrap: bool = True
    landlock: bool = True
    seccomp: bool = True
    cgroup: bool = True
    drop_privileges: bool = True


@dataclass
class SandboxResult:
    passed: bool
    status: str  # passed | failed | timeout | error
    returncode: int | None
    duration_s: float
    output: str = ""  # the tail of the program's stdout+stderr (and the failure's reason)
    isolation: dict = field(default_factory=dict)


def _is_root() -> bool:
    return os.geteuid() == 0


# ----------------------------------------------------------------------------- backends


@functools.lru_cache(maxsize=None)
def namespace_prefix() -> tuple[str, ...]:
    """The ``unshare`` command line that works here, most isolating first; () when none does."""
    unshare = shutil.which("unshare") or ("/usr/bin/unshare" if os.path.exists("/usr/bin/unshare") else None)
    if unshare is None:
        return ()
    user = () if _is_root() else ("--user", "--map-root-user")
    # --ipc: SysV shared memory, queues and semaphores die with the namespace (in the host's they
    # outlive the run); --mount-proc: a mount namespace too, where the working directory becomes
    # a size-capped tmpfs
    for flags in (("--net", "--pid", "--ipc", "--fork", "--kill-child", "--mount-proc"),
                  ("--net", "--pid", "--ipc", "--fork", "--kill-child"),
                  ("--net", "--ipc"),
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
    return ()


def _interpreter_candidates() -> list[str]:
    candidates = [sys.executable]
    for name in ("/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3")):
        if name and os.path.exists(name) and os.path.realpath(name) not in map(os.path.realpath, candidates):
            candidates.append(name)
    return candidates


@dataclass(frozen=True)
class _Setup:
    backend: str  # bwrap | unshare | none
    interpreter: str
    as_nobody: bool  # the program runs as nobody (uid 65534)
    prefix: tuple[str, ...] = ()  # unshare command line


def _setups(limits: SandboxLimits) -> list[_Setup]:
    drop = _is_root() and limits.drop_privileges
    backends = []
    if limits.namespaces and limits.bwrap and shutil.which("bwrap"):
        backends.append(("bwrap", ()))
    if limits.namespaces and namespace_prefix():
        backends.append(("unshare", namespace_prefix()))
    backends.append(("none", ()))
    return [_Setup(backend, interpreter, drop, prefix) for backend, prefix in backends
            for interpreter in _interpreter_candidates()]


@functools.lru_cache(maxsize=None)
def _setup_for(namespaces: bool, bwrap: bool, drop_privileges: bool) -> _Setup:
    limits = SandboxLimits(timeout_s=20, namespaces=namespaces, bwrap=bwrap,
                           drop_privileges=drop_privileges, cgroup=False)
    for setup in _setups(limits):
        result = _run_program(setup, _PROBE_PROGRAM, limits)
        if result.passed:
            return setup
        logger.debug("sandbox: %s with %s does not work: %s", setup.backend, setup.interpreter,
                     result.output[-300:])
    if _is_root() and drop_privileges:
        raise SandboxUnavailable(
            "the evaluator runs as root and no Python interpreter can be run as user 'nobody' "
            f"(tried {', '.join(_interpreter_candidates())}); untrusted code is not run as root. Fix: "
            "install a system python3 (apt-get install python3), or make this interpreter's "
            "directories readable and executable by others (chmod o+rx), or evaluate as an "
            "ordinary user")
    raise SandboxUnavailable("no sandboxed Python interpreter starts here (tried "
                             f"{', '.join(_interpreter_candidates())})")


def setup_for(limits: SandboxLimits) -> _Setup:
    return _setup_for(limits.namespaces, limits.bwrap, limits.drop_privileges)


def isolation_summary(limits: SandboxLimits = SandboxLimits()) -> dict:
    """The isolation a sandboxed run gets on this machine (from one real run)."""
    return run_untrusted("pass", limits).isolation


def available_features(limits: SandboxLimits = SandboxLimits()) -> list[str]:
    return features_of(isolation_summary(limits))


def features_of(isolation: dict) -> list[str]:
    """The :data:`FEATURES` a run's isolation record shows."""
    namespaces = set(isolation.get("namespaces") or ())
    have = {
        "bwrap": isolation.get("backend") == "bwrap",
        "net": "net" in namespaces,
        "pid": "pid" in namespaces,
        "mount": bool(isolation.get("private_tmp")),
        "landlock": bool(isolation.get("landlock_abi")),
        "seccomp": bool(isolation.get("seccomp")),
        "unprivileged": isolation.get("uid") not in (None, 0),
        "memory_total": bool(isolation.get("memory_total_bytes")),
        "disk_total": bool(isolation.get("disk_total_bytes")),
    }
    return [name for name in FEATURES if have[name]]


def check_requirements(require: Sequence[str], limits: SandboxLimits = SandboxLimits()) -> dict:
    """The isolation record of a probe run; SandboxUnavailable when it lacks a required feature."""
    unknown = [r for r in require if r not in FEATURES]
    if unknown:
        raise ValueError(f"eval.sandbox.require: unknown feature(s) {unknown}; use {list(FEATURES)}")
    isolation = isolation_summary(limits)
    missing = [r for r in require if r not in features_of(isolation)]
    if missing:
        fixes = "; ".join(f"{name}: {FIXES[name]}" for name in missing)
        raise SandboxUnavailable(f"eval.sandbox.require asks for {missing}, which this node "
                                 f"({os.uname().nodename}, backend {isolation.get('backend')}) "
                                 f"cannot give. Fix: {fixes}")
    return isolation


# ----------------------------------------------------------------------------- one run


class _Cgroup:
    """The run's own cgroups (one directory per hierarchy holding memory, pids or cpu), or
    nothing where none can be made: the memory of all its processes and tmpfs pages together,
    its process count and its CPU share, each for this run alone."""

    CONTROLLERS = ("memory", "pids", "cpu")

    def __init__(self, paths: Sequence[Path] = (), memory_bytes: int | None = None,
                 pids_max: int | None = None, cpus: float | None = None):
        self.paths, self.memory_bytes, self.pids_max, self.cpus = list(paths), memory_bytes, pids_max, cpus

    @classmethod
    def create(cls, limits: SandboxLimits, owner: int | None) -> "_Cgroup":
        cgroup = cls()
        memory = int(limits.memory_mb) * 2**20
        period = 100_000
        settings = {  # file -> value; the first that exists is how that controller is capped
            "memory": [("memory.limit_in_bytes", memory), ("memory.max", memory),
                       ("memory.memsw.limit_in_bytes", memory), ("memory.swap.max", 0)],
            "pids": [("pids.max", int(limits.max_processes))],
            "cpu": [("cpu.cfs_period_us", period), ("cpu.cfs_quota_us", round(limits.cpus * period)),
                    ("cpu.max", f"{round(limits.cpus * period)} {period}")],
        }
        made: dict[Path, Path] = {}  # parent -> this run's directory there
        for controller in cls.CONTROLLERS:
            parent = _own_cgroup(controller)
            if parent is None:
                continue
            path = made.get(parent)
            try:
                if path is None:
                    path = parent / f"aletheia-sandbox-{secrets.token_hex(6)}"
                    path.mkdir()
                    made[parent] = path
                    cgroup.paths.append(path)
                    if owner is not None:
                        os.chown(path / "cgroup.procs", owner, -1)
                capped = False
                for name, value in settings[controller]:
                    if (path / name).exists():
                        (path / name).write_text(str(value))
                        capped = capped or name in ("memory.limit_in_bytes", "memory.max", "pids.max",
                                                    "cpu.cfs_quota_us", "cpu.max")
            except OSError as exc:
                logger.debug("sandbox: no %s cgroup (%s)", controller, exc)
                continue
            if capped and controller == "memory":
                cgroup.memory_bytes = memory
            elif capped and controller == "pids":
                cgroup.pids_max = int(limits.max_processes)
            elif capped:
                cgroup.cpus = float(limits.cpus)
        return cgroup

    def wrap(self, command: list[str]) -> list[str]:
        """``command`` started by a shell that first moves itself into the cgroups."""
        if not self.paths:
            return command
        moves = " && ".join(f"echo $$ > {shlex.quote(str(path / 'cgroup.procs'))}" for path in self.paths)
        return ["/bin/sh", "-c", f'{moves} && exec "$@"', "sh", *command]

    def remove(self) -> None:
        for path in self.paths:
            for _ in range(200):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:  # processes of the run still exiting
                    time.sleep(0.005)
            else:
                logger.warning("sandbox: could not remove cgroup %s", path)
        self.paths = []


@functools.lru_cache(maxsize=None)
def _own_cgroup(controller: str) -> Path | None:
    """This process's cgroup directory holding ``controller``, where it exists and is writable."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            directory = Path("/sys/fs/cgroup") / controller / path.lstrip("/")
        elif controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            directory = Path("/sys/fs/cgroup") / path.lstrip("/")
            try:
                if controller not in (directory / "cgroup.subtree_control").read_text().split():
                    continue
            except OSError:
                continue
        else:
            continue
        if directory.is_dir() and os.access(directory, os.W_OK):
            return directory
    return None


def _private_mounts(setup: _Setup) -> bool:
    """The unshare backend's program has a mount namespace of its own (and root in it), where
    the boot script builds the run's root."""
    return setup.backend == "unshare" and "--mount-proc" in setup.prefix


def root_layout(interpreter: str) -> dict:
    """What the run's root holds beside /dev, /proc and /tmp, on both namespace backends:
    ``binds`` (host directories, bound read-only at the same path) and ``symlinks`` ([target,
    path]); the interpreter's installation is bound where it lies outside /usr."""
    binds, symlinks = ["/usr"], []
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            symlinks.append([os.readlink(top), top])
        elif os.path.isdir(top):
            binds.append(top)
    prefix = os.path.dirname(os.path.dirname(os.path.realpath(interpreter)))  # <prefix>/bin/python3
    if prefix != "/usr" and not prefix.startswith("/usr/") and os.path.isdir(prefix):
        binds.append(prefix)
    return {"binds": binds, "symlinks": symlinks}


def _bwrap_command(setup: _Setup, limits: SandboxLimits) -> list[str]:
    layout = root_layout(setup.interpreter)
    command = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session"]
    for path in layout["binds"]:
        command += ["--ro-bind", path, path]
    for target, path in layout["symlinks"]:
        command += ["--symlink", target, path]
    for device in boot.DEVICES:
        command += ["--dev-bind", device, device]
    command += ["--ro-bind", str(BOOT_SCRIPT), _BOOT_INSIDE, "--proc", "/proc",
                "--size", str(int(limits.disk_mb) * 2**20), "--tmpfs", "/tmp", "--remount-ro", "/",
                "--chdir", "/tmp", "--", os.path.realpath(setup.interpreter), "-I", "-S", _BOOT_INSIDE]
    return command


class _Output:
    """The run's stdout and stderr: a pipe the evaluator drains without blocking, keeping its
    head and tail. Past :data:`_MAX_OUTPUT_BYTES` it closes its end, so the run's next write
    fails (EPIPE) instead of filling anything."""

    def __init__(self, fd: int):
        os.set_blocking(fd, False)
        self.fd: int | None = fd
        self.head, self.tail, self.total = bytearray(), bytearray(), 0

    def drain(self) -> None:
        """Read what the pipe holds now; close it at its end or past the cap."""
        while self.fd is not None:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            if not chunk:
                self.close()
                return
            self.total += len(chunk)
            room = _OUTPUT_HEAD - len(self.head)
            self.head += chunk[:max(room, 0)]
            self.tail += chunk[max(room, 0):]
            del self.tail[:-_OUTPUT_TAIL]
            if self.total > _MAX_OUTPUT_BYTES:
                self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def text(self) -> str:
        kept = len(self.head) + len(self.tail)
        cut = f"\n[... {self.total - kept} bytes of output left out ...]\n" if self.total > kept else ""
        return (bytes(self.head).decode("utf-8", "replace") + cut
                + bytes(self.tail).decode("utf-8", "replace"))


class _Run:
    """One sandboxed process: launched with a request, killed and cleaned up by :meth:`close`."""

    def __init__(self, setup: _Setup, limits: SandboxLimits, request: dict, serve: bool):
        self.setup, self.limits = setup, limits
        self.base = Path(tempfile.mkdtemp(prefix="aletheia-sandbox-"))
        self.proc: subprocess.Popen | None = None
        self.cgroup = _Cgroup()
        self.calls_w = self.replies_r = None
        run_as = NOBODY[0] if (setup.as_nobody and setup.backend == "bwrap") else None
        if setup.backend == "bwrap":
            workdir, cwd = "/tmp", "/"
        else:  # the work directory, or (private root) only the mount point of the run's root
            work = self.base / "work"
            work.mkdir()
            if setup.as_nobody:  # nobody may pass through base (0711, not list it) to its dir
                os.chmod(self.base, 0o711)
                os.chown(work, *NOBODY)
            workdir, cwd = str(work), work
        if limits.cgroup:
            self.cgroup = _Cgroup.create(limits, run_as)
        request = {**request, "workdir": workdir, "landlock": limits.landlock,
                   "root": ({**root_layout(setup.interpreter), "tmp_bytes": int(limits.disk_mb) * 2**20}
                            if _private_mounts(setup) else None),
                   "seccomp": limits.seccomp,
                   # no PID namespace: _terminate kills the process group, so nothing may leave it
                   "keep_process_group": setup.backend == "none" or (
                       setup.backend == "unshare" and "--pid" not in setup.prefix),
                   "drop_to": list(NOBODY) if setup.as_nobody and run_as is None else None,
                   "limits": {"cpu_s": max(1, math.ceil(limits.timeout_s)),
                              "memory_bytes": int(limits.memory_mb) * 2**20,
                              "nproc": None if self.cgroup.pids_max else int(limits.max_processes),
                              "fsize_bytes": int(limits.max_file_mb) * 2**20,
                              "nofile": int(limits.max_open_files)}}
        out_r, out_w = os.pipe()
        self.output = _Output(out_r)
        pass_fds: tuple[int, ...] = ()
        if serve:
            calls_r, self.calls_w = os.pipe()
            self.replies_r, replies_w = os.pipe()
            os.set_blocking(self.calls_w, False)
            request.update(calls_in=calls_r, calls_out=replies_w)
            pass_fds = (calls_r, replies_w)
        if setup.backend == "bwrap":
            command = _bwrap_command(setup, limits)
        else:
            command = [*setup.prefix, setup.interpreter, "-I", "-S", str(BOOT_SCRIPT)]
        command = self.cgroup.wrap(command)
        env = {**_ENV, "HOME": workdir, "TMPDIR": workdir}
        self.started = time.monotonic()
        try:
            self.proc = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=out_w, stderr=out_w, cwd=cwd,
                env=env, start_new_session=True, close_fds=True, pass_fds=pass_fds,
                **({"user": run_as, "group": NOBODY[1], "extra_groups": []} if run_as is not None else {}))
        finally:
            for fd in (*pass_fds, out_w):
                os.close(fd)
        try:
            self.proc.stdin.write(json.dumps(request).encode("utf-8"))
            self.proc.stdin.close()
        except OSError:  # the sandbox died before reading its request: its output says why
            pass

    def isolation(self, inside: dict) -> dict:
        """What this run applied: the backend's layers and what the boot script reported."""
        setup = self.setup
        if setup.backend == "bwrap":
            namespaces = ["user", "net", "pid", "ipc", "uts", "cgroup", "mount"]
        else:
            namespaces = [f.lstrip("-") for f in setup.prefix if f in ("--net", "--pid", "--ipc", "--user")]
            namespaces += ["mount"] if _private_mounts(setup) else []
        inside = dict(inside)
        private_root = setup.backend == "bwrap" or bool(inside.pop("private_root", False))
        record = {"backend": setup.backend, "interpreter": setup.interpreter,
                  "namespaces": namespaces, "private_tmp": private_root,
                  "memory_total_bytes": self.cgroup.memory_bytes, "pids_max": self.cgroup.pids_max,
                  "cpus": self.cgroup.cpus,
                  "disk_total_bytes": int(self.limits.disk_mb) * 2**20 if setup.backend == "bwrap" else None}
        record.update(inside)  # unshare: disk_total_bytes where the boot script built the root
        if setup.backend == "bwrap" and setup.as_nobody:
            record["uid"] = NOBODY[0]  # the uid outside; inside the user namespace it is the same
        return record

    def wait(self, deadline: float) -> bool:
        """Wait for the process to exit by ``deadline``, draining its output; False on timeout."""
        try:  # a pidfd wakes up at the exit; Popen.wait(timeout) polls in growing sleeps
            pidfd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):
            pidfd = None
        try:
            while (left := deadline - time.monotonic()) > 0:
                watched = [fd for fd in (pidfd, self.output.fd) if fd is not None]
                if not watched:
                    break
                ready, _, _ = select.select(watched, [], [], min(left, 0.05) if pidfd is None else left)
                if self.output.fd in ready:
                    self.output.drain()
                if pidfd in ready or (pidfd is None and self.proc.poll() is not None):
                    break
        finally:
            if pidfd is not None:
                os.close(pidfd)
        try:
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            return True
        except subprocess.TimeoutExpired:
            return False

    def close(self) -> tuple[int | None, float, str]:
        """Kill everything left, clean up; (returncode, seconds, output). Never raises."""
        duration = time.monotonic() - self.started
        for fd in (self.calls_w, self.replies_r):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        returncode = None
        try:
            if self.proc is not None:
                _terminate(self.proc, pid_namespace="--pid" in self.setup.prefix)
                returncode = self.proc.returncode
            self.output.drain()  # every writer is dead: what is left, up to the end
        except Exception as exc:  # noqa: BLE001 - one run's debris must not end the batch
            logger.warning("sandbox: cleanup of %s: %s", self.base, exc)
        self.output.close()
        self.cgroup.remove()
        remove_tree(self.base)
        return returncode, duration, self.output.text()


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def _terminate(proc: subprocess.Popen, pid_namespace: bool) -> None:
    """Kill everything the run left behind and reap the leader.

    With an ``unshare`` PID namespace the leader is ``unshare`` and its child is the sandbox's
    init: killing that init first tears the whole namespace down. bubblewrap's sandbox dies with
    bwrap (``--die-with-parent``), and with its PID namespace everything in it.
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
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


# ----------------------------------------------------------------------------- whole programs


def run_untrusted(program: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run ``program`` once in the sandbox; passed = it ran to its end without an exception
    (the program's own claim: a containment check, not a verdict)."""
    return _run_program(setup_for(limits), program, limits)


def _run_program(setup: _Setup, program: str, limits: SandboxLimits) -> SandboxResult:
    nonce = secrets.token_hex(16)
    run = _Run(setup, limits, {"mode": "program", "program": program, "nonce": nonce}, serve=False)
    timed_out = not run.wait(run.started + limits.timeout_s)
    returncode, duration, tail = run.close()
    isolation: dict = {}
    if tail.startswith(boot.HEADER) or boot.HEADER in tail[:4096]:
        first, _, rest = tail[tail.index(boot.HEADER):].partition("\n")
        try:
            isolation = json.loads(first[len(boot.HEADER):])
        except ValueError:
            isolation = {}
        tail = rest
    marker = boot.PASS_MARKER + nonce
    lines = tail.rstrip("\n").split("\n")
    passed = not timed_out and returncode == 0 and lines[-1] == marker
    if passed:
        tail = "\n".join(lines[:-1])
    status = "passed" if passed else ("timeout" if timed_out else "failed")
    return SandboxResult(passed=passed, status=status, returncode=returncode, duration_s=duration,
                         output=tail.strip("\n")[-4000:], isolation=run.isolation(isolation))


def run_many(programs: Sequence[str], limits: SandboxLimits = SandboxLimits(), workers: int = 2,
             on_done: Callable[[int, SandboxResult], None] | None = None) -> list[SandboxResult]:
    """Run each program in its own sandbox, ``workers`` at a time; results in input order."""
    return map_guarded(lambda program: run_untrusted(program, limits), programs, workers, on_done,
                       setup=lambda: setup_for(limits))


def map_guarded(function: Callable[[Any], SandboxResult], items: Sequence, workers: int,
                on_done: Callable[[int, SandboxResult], None] | None, setup: Callable[[], Any]
                ) -> list[SandboxResult]:
    """``function`` over ``items`` in threads; an item whose run raises gets an ``error`` result
    (a batch survives any one completion)."""
    setup()  # probe once, before the threads race for it
    results: list[SandboxResult | None] = [None] * len(items)

    def one(index: int) -> None:
        started = time.monotonic()
        try:
            results[index] = function(items[index])
        except SandboxUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded in the result, the batch goes on
            logger.warning("sandbox: run %d raised %s: %s", index, type(exc).__name__, exc)
            results[index] = SandboxResult(False, "error", None, time.monotonic() - started,
                                           f"{type(exc).__name__}: {exc}")
        if on_done is not None:
            on_done(index, results[index])

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for future in [pool.submit(one, i) for i in range(len(items))]:
            future.result()
    return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------- judged functions


class CandidateRaised(Exception):
    """The candidate's function raised; tests see an exception, as if it ran in-process."""


class _Broken(Exception):
    """The sandbox broke the protocol (died, timed out, sent garbage): the problem fails."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status


class _Channel:
    def __init__(self, run: _Run, deadline: float):
        self.run, self.deadline = run, deadline
        self.buffer, self.scanned = bytearray(), 0  # bytes before ``scanned`` hold no newline

    def receive(self) -> dict:
        while (end := self.buffer.find(b"\n", self.scanned)) < 0:
            self.scanned = len(self.buffer)
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise _Broken("timeout", "the candidate did not answer in time")
            ready, _, _ = select.select([self.run.replies_r], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.run.replies_r, 1 << 16)
            if not chunk:
                raise _Broken("failed", "the candidate's process ended")
            self.buffer += chunk
            if len(self.buffer) > boot.MAX_REPLY_BYTES:
                raise _Broken("failed", "the candidate's reply is too large")
        line = bytes(self.buffer[:end])
        del self.buffer[:end + 1]
        self.scanned = 0
        try:
            message = boot.decode_message(line)
        except Exception as exc:  # noqa: BLE001 - e.g. OverflowError from {"complex": [10**400, 0]}
            raise _Broken("failed", f"malformed reply from the candidate ({type(exc).__name__}: "
                                    f"{exc})"[:2000]) from None
        if not isinstance(message, dict) or len(message) != 1:
            raise _Broken("failed", "malformed reply from the candidate")
        return message

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise _Broken("timeout", "the candidate did not take its arguments in time")
            _, ready, _ = select.select([], [self.run.calls_w], [], left)
            if ready:
                try:
                    view = view[os.write(self.run.calls_w, view):]
                except BlockingIOError:  # the pipe filled between select and write
                    continue
                except OSError:
                    raise _Broken("failed", "the candidate's process ended") from None


class _Candidate:
    """The test's view of the candidate: a callable that forwards each call to the sandbox."""

    def __init__(self, channel: _Channel):
        self.channel, self.broken, self.calls = channel, None, 0

    def __call__(self, *args):
        if self.broken is not None:
            raise self.broken
        call = secrets.token_hex(8)
        try:
            self.channel.send(boot.encode_message("args", [call, boot.encode_value(list(args))]))
            reply = self.channel.receive()
            (kind, payload), = reply.items()
            if kind not in ("ok", "raised") or not isinstance(payload, list) or len(payload) != 2 \
                    or payload[0] != call:
                raise _Broken("failed", f"a reply that does not answer call {self.calls + 1}")
        except _Broken as exc:
            self.broken = exc
            raise
        self.calls += 1
        if kind == "raised":
            raise CandidateRaised(str(payload[1]))
        return payload[1]


def judge_function(program: str, entry_point: str, check: Callable[[Callable], Any],
                   limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Load ``program`` in the sandbox and run ``check(candidate)`` here, in this process.

    ``candidate(*args)`` calls ``entry_point`` in the sandbox. Passed = ``check`` returned
    without an exception and the sandbox kept to the protocol throughout; the sandbox has no say.
    """
    setup = setup_for(limits)
    run = _Run(setup, limits, {"mode": "serve", "program": program, "entry_point": entry_point},
               serve=True)
    try:  # whatever happens here, the sandbox is killed and its directory and cgroup removed
        status, reason, inside = _converse(_Channel(run, run.started + limits.timeout_s), check)
    finally:
        returncode, duration, tail = run.close()
    output = (tail.strip("\n") + ("\n" + reason if reason else "")).strip("\n")[-4000:]
    return SandboxResult(passed=status == "passed", status=status, returncode=returncode,
                         duration_s=duration, output=output, isolation=run.isolation(inside))


def _converse(channel: _Channel, check: Callable[[Callable], Any]) -> tuple[str, str, dict]:
    """The protocol of one judged run: (status, reason, what the sandbox reported applying)."""
    inside: dict = {}
    try:
        hello = channel.receive()
        inside = hello.get("hello") if isinstance(hello.get("hello"), dict) else {}
        ready = channel.receive()
        if "ready" not in ready:
            raise _Broken("failed", f"the program did not load: {ready.get('load_error', ready)}"[:2000])
        candidate = _Candidate(channel)
        try:
            check(candidate)
        except _Broken:
            raise
        except BaseException as exc:  # noqa: BLE001 - a failed test, whatever it raised
            if candidate.broken is not None:
                raise candidate.broken from None
            raise _Broken("failed", f"{type(exc).__name__}: {exc}"[:2000]) from None
        if candidate.broken is not None:  # a test that swallowed the breakage still fails
            raise candidate.broken
        return "passed", "", inside
    except _Broken as exc:
        return exc.status, str(exc), inside


# ----------------------------------------------------------------------------- cleanup


def remove_tree(path: Path) -> None:
    """Delete ``path`` and everything beneath it, however deep: no recursion, one open directory
    at a time (it climbs back through ``..``, safe because every sandboxed process is dead by
    now), no link followed, read-only directories made writable. What it cannot delete is logged
    and skipped; it never raises."""
    path = Path(path)
    names: list[str] = []  # the directories descended into, below ``path``
    skip: list[set[str]] = [set()]  # per depth, entries that could not be deleted
    current = None
    try:
        os.chmod(path, 0o700, follow_symlinks=False)
        current = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        while True:
            child = None
            with os.scandir(current) as entries:
                for entry in entries:
                    if entry.name in skip[-1]:
                        continue
                    try:
                        if stat.S_ISDIR(os.stat(entry.name, dir_fd=current,
                                                follow_symlinks=False).st_mode):
                            os.chmod(entry.name, 0o700, dir_fd=current)
                            child = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                                            dir_fd=current)
                            names.append(entry.name)
                            break
                        os.unlink(entry.name, dir_fd=current)
                    except OSError:
                        skip[-1].add(entry.name)
            if child is not None:
                os.close(current)
                current = child
                skip.append(set())
                continue
            if not names:
                break
            name = names.pop()
            parent = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=current)
            os.close(current)
            current = parent
            skip.pop()
            try:
                os.rmdir(name, dir_fd=current)
            except OSError:
                skip[-1].add(name)
        os.close(current)
        current = None
        os.rmdir(path)
    except Exception as exc:  # noqa: BLE001 - leftovers are logged, never fatal
        logger.warning("sandbox: could not delete all of %s: %s", path, exc)
    finally:
        if current is not None:
            os.close(current)

