"""Trusted bootstrap of one sandboxed run (executed as ``python -I -S _sandbox_boot.py``).

Standard library only: it may run under an interpreter other than the project's (see
``sandbox.py``). It reads a JSON request from stdin, then, before any untrusted code runs:

1. points stdin at /dev/null, mounts a size-capped tmpfs on the working directory when it has a
   mount namespace of its own (the ``unshare`` backend), and moves into it;
2. applies a Landlock ruleset (when the kernel has Landlock): writes only beneath the working
   directory (and /dev/null), reads only beneath the interpreter's and the system's directories,
   no TCP bind/connect (ABI >= 4), no signals to processes outside the sandbox and no abstract
   unix sockets (ABI >= 6); sets no_new_privs;
3. installs a seccomp filter that refuses sockets of any family but AF_INET and AF_INET6 (which
   the network namespace and Landlock confine): no filesystem socket outside the sandbox, e.g.
   munge, a database or a tmux server, can be reached, nor a VM's host over AF_VSOCK; and
   io_uring, kernel keyrings, and every syscall of another ABI (32-bit and x32 entry points);
   without a PID namespace also setsid/setpgid (the evaluator kills the process group);
4. drops root to an unprivileged uid/gid when asked;
5. sets the resource limits (CPU seconds, address space, processes, file size, open files, no core).

Then, in ``program`` mode, it writes one header line describing what was applied and executes the
program (used by the containment tests; the pass marker is the program's own claim, not a
verdict). In ``serve`` mode (HumanEval) it reports what was applied on the reply pipe, executes the
program and then answers calls of its entry point: one JSON line ``{"args": [<call id>, <encoded arguments>]}`` in, one JSON line
``{"ok": [<call id>, <encoded result>]}`` or ``{"raised": [<call id>, "<error>"]}`` out (the id
is random per call, so no reply can be written before its call arrives). The tests, and so the verdict,
live in the evaluator's process; nothing the program does here can change them.
"""

import ctypes
import json
import os
import resource
import stat
import sys

HEADER = "#aletheia-sandbox "
PASS_MARKER = "#aletheia-sandbox-pass "

# Landlock constants (linux/landlock.h)
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_REMOVE_DIR, _FS_REMOVE_FILE, _FS_MAKE_CHAR, _FS_MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
_FS_MAKE_REG, _FS_MAKE_SOCK, _FS_MAKE_FIFO, _FS_MAKE_BLOCK = 1 << 8, 1 << 9, 1 << 10, 1 << 11
_FS_MAKE_SYM, _FS_REFER, _FS_TRUNCATE = 1 << 12, 1 << 13, 1 << 14
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1
_FILE_ONLY = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_PR_SET_NO_NEW_PRIVS = 38
_RULE_PATH_BENEATH = 1


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _syscall(libc, number, *args):
    result = libc.syscall(ctypes.c_long(number), *args)
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result


def landlock_abi():
    """The kernel's Landlock ABI version, 0 when unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return max(int(libc.syscall(ctypes.c_long(_SYS_CREATE_RULESET), None, ctypes.c_size_t(0),
                                    ctypes.c_uint32(1))), 0)
    except Exception:  # noqa: BLE001 - no libc syscall(), not Linux, ...
        return 0


def _read_roots():
    roots = {"/usr", "/lib", "/lib32", "/lib64", "/bin", "/sbin", "/etc", "/proc", "/dev",
             sys.base_prefix, sys.base_exec_prefix,  # not a venv's prefix: its site-packages
             os.path.dirname(os.path.realpath(sys.executable))}
    for entry in sys.path:
        if entry and os.path.isabs(entry):
            roots.add(entry)
    return sorted(r for r in roots if os.path.exists(r))


def apply_landlock(workdir):
    """Restrict this process and its future children; returns the ABI used (0 = not applied)."""
    abi = landlock_abi()
    if abi < 1:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    read = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
    write = (_FS_WRITE_FILE | _FS_REMOVE_DIR | _FS_REMOVE_FILE | _FS_MAKE_CHAR | _FS_MAKE_DIR
             | _FS_MAKE_REG | _FS_MAKE_SOCK | _FS_MAKE_FIFO | _FS_MAKE_BLOCK | _FS_MAKE_SYM)
    if abi >= 2:
        write |= _FS_REFER
    if abi >= 3:
        write |= _FS_TRUNCATE
    attr = _RulesetAttr(read | write, 0, 0)
    size = 8
    if abi >= 4:
        attr.handled_access_net = _NET_BIND_TCP | _NET_CONNECT_TCP  # no rule grants any port
        size = 16
    if abi >= 6:
        attr.scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL
        size = 24
    ruleset = _syscall(libc, _SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                       ctypes.c_uint32(0))
    rules = [(root, read) for root in _read_roots()]
    rules += [(workdir, read | write), (os.devnull, _FS_READ_FILE | _FS_WRITE_FILE)]
    try:
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    access &= _FILE_ONLY
                rule = _PathBeneathAttr(access & (read | write), fd)
                _syscall(libc, _SYS_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_RULE_PATH_BENEATH),
                         ctypes.byref(rule), ctypes.c_uint32(0))
            finally:
                os.close(fd)
        set_no_new_privs()  # required by landlock_restrict_self for an unprivileged caller
    except OSError:
        os.close(ruleset)
        raise
    _syscall(libc, _SYS_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0))
    os.close(ruleset)
    return abi


def set_no_new_privs():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(ctypes.c_int(_PR_SET_NO_NEW_PRIVS), ctypes.c_ulong(1), ctypes.c_ulong(0),
                  ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def mount_tmpfs(path, size, owner):
    """A tmpfs of ``size`` bytes on ``path`` (in this process's own mount namespace: it goes
    with the namespace) for everything the run writes; its size, or None where it cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    options = f"size={int(size)},mode=0700".encode()
    if libc.mount(b"tmpfs", path.encode(), b"tmpfs", ctypes.c_ulong(2 | 4), options) != 0:  # nosuid, nodev
        return None
    if owner is not None:
        os.chown(path, *owner)
    return int(size)


def set_limits(limits):
    applied = {}
    for name, value in (("RLIMIT_CORE", 0), ("RLIMIT_CPU", limits["cpu_s"]),
                        ("RLIMIT_AS", limits["memory_bytes"]), ("RLIMIT_NPROC", limits["nproc"]),
                        ("RLIMIT_FSIZE", limits["fsize_bytes"]), ("RLIMIT_NOFILE", limits["nofile"])):
        kind = getattr(resource, name)
        _, hard = resource.getrlimit(kind)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        # CPU: SIGXCPU at the soft limit, SIGKILL one second later
        new_hard = value + 1 if name == "RLIMIT_CPU" else value
        if hard != resource.RLIM_INFINITY:
            new_hard = min(new_hard, hard)
        resource.setrlimit(kind, (value, new_hard))
        applied[name] = value
    return applied


def drop_privileges(uid, gid):
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise OSError("could not drop privileges")


# seccomp (linux/seccomp.h, linux/filter.h, linux/audit.h)
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
_RET_ALLOW, _RET_EPERM = 0x7FFF0000, 0x00050000 | 1
_LD_W_ABS, _JEQ_K, _JGE_K, _RET_K = 0x20, 0x15, 0x35, 0x06
# the only socket families: those the network namespace and Landlock confine (AF_VSOCK reaches a
# VM's host from any namespace; AF_UNIX a host service; the rest is kernel attack surface)
_SOCKET_FAMILIES = (2, 10)  # AF_INET, AF_INET6
# machine -> (audit arch, socket, refused syscalls: io_uring_setup/enter/register, add_key,
# request_key, keyctl (a key outlives the run in the user's keyring); setsid, setpgid)
_SYSCALLS = {"x86_64": (0xC000003E, 41, (425, 426, 427, 248, 249, 250), (112, 109)),
             "aarch64": (0xC00000B7, 198, (425, 426, 427, 217, 218, 219), (157, 154))}


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def seccomp_program(arch, sys_socket, refused):
    """The BPF program: (code, jt, jf, k) per instruction; a jump of j from instruction i lands
    on i + 1 + j. Offsets in struct seccomp_data: nr 0, arch 4, args[0] (low word) 16."""
    families = len(_SOCKET_FAMILIES)
    allow = 8 + families + len(refused)  # the index of RET ALLOW; RET EPERM follows it
    deny = allow + 1
    program = [
        (_LD_W_ABS, 0, 0, 4),                      # 0: arch
        (_JEQ_K, 1, 0, arch),                      # 1: native ABI -> 3
        (_RET_K, 0, 0, _RET_EPERM),                # 2
        (_LD_W_ABS, 0, 0, 0),                      # 3: syscall number
        (_JGE_K, 0, 1, 0x40000000),                # 4: x32 bit set -> 5, else -> 6
        (_RET_K, 0, 0, _RET_EPERM),                # 5
        (_JEQ_K, 0, 1 + families, sys_socket),     # 6: socket -> 7, else -> the refused list
        (_LD_W_ABS, 0, 0, 16),                     # 7: its domain
    ]
    for n, family in enumerate(_SOCKET_FAMILIES, start=1):  # one of them -> ALLOW; none -> EPERM
        i = len(program)
        program.append((_JEQ_K, allow - i - 1, deny - i - 1 if n == families else 0, family))
    for number in refused:
        i = len(program)
        program.append((_JEQ_K, deny - i - 1, 0, number))
    program += [(_RET_K, 0, 0, _RET_ALLOW), (_RET_K, 0, 0, _RET_EPERM)]
    return program


def apply_seccomp(keep_process_group=False):
    """Refuse sockets other than AF_INET/AF_INET6, io_uring, keyrings and foreign-ABI syscalls,
    and with ``keep_process_group`` leaving the process group (without a PID namespace, killing
    the group is what kills everything the run started); False where not supported."""
    machine = os.uname().machine
    if machine not in _SYSCALLS:
        return False
    arch, sys_socket, refused, group = _SYSCALLS[machine]
    program = seccomp_program(arch, sys_socket, refused + (group if keep_process_group else ()))
    filters = (_SockFilter * len(program))(*[_SockFilter(*ins) for ins in program])
    fprog = _SockFprog(len(program), filters)
    libc = ctypes.CDLL(None, use_errno=True)
    set_no_new_privs()
    if libc.prctl(ctypes.c_int(_PR_SET_SECCOMP), ctypes.c_ulong(_SECCOMP_MODE_FILTER),
                  ctypes.byref(fprog), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return True


# ----------------------------------------------------------------------------- values
# Arguments and results cross the sandbox boundary as JSON: lists, str, int, float, bool and None
# as themselves, other containers tagged ({"tuple": [...]}), so decoding yields plain built-in
# values only (never pickle: decoding must not run code).
_TAGS = {"tuple": tuple, "set": set, "frozenset": frozenset}


def encode_value(value):
    if value is None or isinstance(value, bool):
        return None if value is None else bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, list):
        return [encode_value(v) for v in value]
    for tag, kind in _TAGS.items():
        if isinstance(value, kind):
            return {tag: [encode_value(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[encode_value(k), encode_value(v)] for k, v in value.items()]}
    if isinstance(value, complex):
        return {"complex": [value.real, value.imag]}
    if isinstance(value, bytes):
        return {"bytes": bytes(value).hex()}
    raise TypeError(f"a {type(value).__name__} cannot cross the sandbox boundary")


def _decode_object(obj):
    if len(obj) != 1:
        raise ValueError(f"malformed value {sorted(obj)!r}")
    (tag, payload), = obj.items()
    if tag in _TAGS and isinstance(payload, list):
        return _TAGS[tag](payload)
    if tag == "dict" and isinstance(payload, list):
        return {k: v for k, v in payload}
    if tag == "complex" and isinstance(payload, list) and len(payload) == 2:
        return complex(*payload)
    if tag == "bytes" and isinstance(payload, str):
        return bytes.fromhex(payload)
    if tag in ("ok", "raised", "ready", "hello", "load_error", "args"):
        return {tag: payload}  # message envelopes
    raise ValueError(f"unknown value tag {tag!r}")


def decode_message(line):
    """A JSON line -> plain Python values (ValueError/TypeError/RecursionError when malformed)."""
    return json.loads(line, object_hook=_decode_object)


def encode_message(tag, payload):
    return (json.dumps({tag: payload}, allow_nan=True) + "\n").encode("utf-8")


def _serve(namespace, entry_point, calls_in, calls_out):
    """Answer calls of ``entry_point`` until the evaluator closes the pipe."""
    function = namespace.get(entry_point)
    if not callable(function):
        os.write(calls_out, encode_message("load_error", f"{entry_point!r} is not defined"))
        os._exit(1)
    os.write(calls_out, encode_message("ready", True))
    reader = os.fdopen(calls_in, "rb", buffering=1 << 16)
    while True:
        line = reader.readline()
        if not line:
            os._exit(0)
        call, args = decode_message(line)["args"]
        try:
            reply = encode_message("ok", [call, encode_value(function(*args))])
        except BaseException as exc:  # noqa: BLE001 - the candidate's failure, reported as such
            reply = encode_message("raised", [call, f"{type(exc).__name__}: {exc}"[:2000]])
        sys.stdout.flush()
        _write_all(calls_out, reply)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def main():
    request = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    workdir = request["workdir"]
    report = {"pid": os.getpid(), "landlock_abi": 0, "uid": os.getuid(), "seccomp": False}
    if request.get("workdir_tmpfs_bytes"):
        report["disk_total_bytes"] = mount_tmpfs(workdir, request["workdir_tmpfs_bytes"],
                                                 request.get("drop_to"))
    os.chdir(workdir)
    if request.get("landlock", True):
        report["landlock_abi"] = apply_landlock(workdir)
    if request.get("seccomp", True):
        report["seccomp"] = apply_seccomp(request.get("keep_process_group", False))
    if not report["landlock_abi"] and not report["seccomp"]:
        try:
            set_no_new_privs()
        except OSError:
            pass
    if request.get("drop_to") is not None:
        uid, gid = request["drop_to"]
        drop_privileges(uid, gid)
        report["uid"] = os.getuid()
    report["rlimits"] = set_limits(request["limits"])
    serve = request.get("mode") == "serve"
    if serve:
        calls_in, calls_out = request["calls_in"], request["calls_out"]
        os.write(calls_out, encode_message("hello", encode_value(report)))
    else:
        os.write(1, (HEADER + json.dumps(report, sort_keys=True) + "\n").encode())
    program = request["program"]
    nonce = request.get("nonce", "")
    entry_point = request.get("entry_point")
    del request
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(program, "<candidate>", "exec"), namespace)  # noqa: S102 - the sandbox's job
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException as exc:  # noqa: BLE001 - any failure, SystemExit included, is a failed program
        import traceback
        try:
            traceback.print_exc()
            sys.stderr.flush()
            if serve:
                os.write(calls_out, encode_message("load_error", f"{type(exc).__name__}: {exc}"[:2000]))
        finally:
            os._exit(1)
    if serve:
        _serve(namespace, entry_point, calls_in, calls_out)
    os.write(1, ("\n" + PASS_MARKER + nonce + "\n").encode())
    os._exit(0)


if __name__ == "__main__":
    main()
