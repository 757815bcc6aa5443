"""The sandbox contains hostile completions; each test proves the harm did not happen.

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
    assert limits["RLIMIT_AS"] == 1024 * 2**20 and limits["RLIMIT_NPROC"] == 16
    assert limits["RLIMIT_CPU"] == 2 and limits["RLIMIT_FSIZE"] == 16 * 2**20
    assert limits["RLIMIT_NOFILE"] == 64
    if os.geteuid() == 0 and sandbox.sandbox_interpreter(True)[1]:
        assert result.isolation["uid"] == 65534
    if LANDLOCK:
        assert result.isolation["landlock_abi"] == LANDLOCK
    if HAS_PIDNS:
        assert result.isolation["pid"] == 1


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
    if sandbox.isolation_summary()["rlimit_nproc_enforced"]:
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
    assert set(summary) >= {"namespaces", "landlock_abi", "interpreter", "runs_as",
                            "rlimit_nproc_enforced"}
    assert os.access(summary["interpreter"], os.X_OK)
    assert stat.S_ISREG(os.stat(summary["interpreter"]).st_mode)
