"""Trusted bootstrap of one sandboxed run (executed as ``python -I _sandbox_boot.py``).

Standard library only: it may run under an interpreter other than the project's (see
``sandbox.py``). It reads a JSON request from stdin, then, before any untrusted code runs:

1. moves into the throw-away working directory and points stdin at /dev/null;
2. applies a Landlock ruleset (when the kernel has Landlock): writes only beneath the working
   directory (and /dev/null), reads only beneath the interpreter's and the system's directories,
   no TCP bind/connect (ABI >= 4), no signals to processes outside the sandbox and no abstract
   unix sockets (ABI >= 6); sets no_new_privs;
3. drops root to an unprivileged uid/gid when asked (so RLIMIT_NPROC applies and root-owned
   files are out of reach);
4. sets the resource limits (CPU seconds, address space, processes, file size, open files, no core);
5. writes one header line describing what was applied, then executes the program in a fresh
   ``__main__`` namespace. Success = the program ran to its end without an exception; only then
   is the request's nonce written as the last line. A program that exits early (sys.exit,
   os._exit, a signal) never prints it and so fails.
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
             sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
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


def main():
    request = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    workdir = request["workdir"]
    os.chdir(workdir)
    report = {"pid": os.getpid(), "landlock_abi": 0, "uid": os.getuid()}
    if request.get("landlock", True):
        report["landlock_abi"] = apply_landlock(workdir)
    if not report["landlock_abi"]:
        try:
            set_no_new_privs()
        except OSError:
            pass
    if request.get("drop_to") is not None:
        uid, gid = request["drop_to"]
        drop_privileges(uid, gid)
        report["uid"] = os.getuid()
    report["rlimits"] = set_limits(request["limits"])
    os.write(1, (HEADER + json.dumps(report, sort_keys=True) + "\n").encode())
    program = request["program"]
    nonce = request["nonce"]
    del request
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(program, "<candidate>", "exec"), namespace)  # noqa: S102 - the sandbox's job
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - any failure, SystemExit included, is a failed program
        import traceback
        try:
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(1)
    os.write(1, ("\n" + PASS_MARKER + nonce + "\n").encode())
    os._exit(0)


if __name__ == "__main__":
    main()
