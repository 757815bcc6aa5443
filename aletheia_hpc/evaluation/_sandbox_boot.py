"""Trusted bootstrap of one sandboxed run (executed as ``python -I -S _sandbox_boot.py``).

Standard library only: it may run under an interpreter other than the project's (see
``sandbox.py``). It reads a JSON request from stdin, then, before any untrusted code runs:

1. points stdin at /dev/null; with a mount namespace of its own (the ``unshare`` backend) it
   builds the run's root, as bubblewrap does: a tmpfs holding read-only binds of the system and
   interpreter directories, /dev with null, zero and urandom only, a fresh /proc and a
   size-capped tmpfs /tmp (the working directory), then ``pivot_root`` into it and detaches the
   host's tree, so no host file, socket or directory outside those binds exists for the run;
2. applies a Landlock ruleset (when the kernel has Landlock): writes only beneath the working
   directory (and /dev/null), reads only beneath the interpreter's and the system's directories
   and those three devices, no TCP bind/connect (ABI >= 4), no signals to processes outside the
   sandbox and no abstract unix sockets (ABI >= 6); sets no_new_privs;
3. installs a seccomp filter (:func:`seccomp_program`): sockets and socket pairs of AF_INET and
   AF_INET6 only (which the network namespace and Landlock confine), no new namespaces (unshare,
   setns, clone with CLONE_NEW*, clone3), no mounts (old and new mount API), no inotify or
   fanotify, no io_uring, kernel keyrings or fallocate, no syscall of another ABI; without a
   PID namespace also no setsid/setpgid (the evaluator kills the process group);
4. drops root to an unprivileged uid/gid when asked;
5. sets the resource limits (CPU seconds, address space, file size, open files, no core; the
   process count only where no pids cgroup caps the run).

Then, in ``program`` mode, it writes one header line describing what was applied and executes the
program (used by the containment tests; the pass marker is the program's own claim, not a
verdict). In ``serve`` mode (HumanEval) it reports what was applied on the reply pipe, executes the
program and then answers calls of its entry point: one JSON line
``{"args": [<call id>, <encoded arguments>]}`` in, one JSON line ``{"ok": [<call id>, <encoded
result>]}`` or ``{"raised": [<call id>, "<error>"]}`` out (the id is random per call, so no reply
can be written before its call arrives). The tests, and so the verdict, live in the evaluator's
process; nothing the program does here can change them. The evaluator decodes each reply with
:func:`decode_message`, whose work is linear in the reply's (capped) size.
"""

import ctypes
import json
import os
import resource
import select
import stat
import sys
import time

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


# the only devices a run sees (the root it gets has no others; Landlock allows no others)
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom")


def _read_roots():
    roots = {"/usr", "/lib", "/lib32", "/lib64", "/bin", "/sbin", "/etc", "/proc", *DEVICES,
             sys.base_prefix, sys.base_exec_prefix,  # not a venv's prefix: its site-packages
             os.path.dirname(os.path.realpath(sys.executable))}
    for entry in sys.path:
        if entry and os.path.isabs(entry):
            roots.add(entry)
    return sorted(r for r in roots if os.path.exists(r))


def apply_landlock(workdir):
    """Restrict this process and its future children; returns the ABI used (0 = not applied).
    (Landlock has no right for stat, readlink, getxattr or named unix sockets: the private root
    is what hides the host's paths from those.)"""
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


# mount(2) flags (linux/mount.h) and statvfs flags (sys/statvfs.h)
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_NOATIME, _MS_NODIRATIME, _MS_BIND = 32, 1024, 2048, 4096
_MS_REC, _MS_PRIVATE, _MS_RELATIME = 1 << 14, 1 << 18, 1 << 21
_MNT_DETACH = 2
# a bind's remount must keep the flags locked on its source (in a user namespace, EPERM else)
_LOCKED_FLAGS = ((os.ST_NOSUID, _MS_NOSUID), (os.ST_NODEV, _MS_NODEV), (os.ST_NOEXEC, _MS_NOEXEC),
                 (os.ST_NOATIME, _MS_NOATIME), (os.ST_NODIRATIME, _MS_NODIRATIME),
                 (os.ST_RELATIME, _MS_RELATIME))
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}


def _mount(source, target, fstype, flags, options=None):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(None if source is None else source.encode(), target.encode(),
                  None if fstype is None else fstype.encode(), ctypes.c_ulong(flags),
                  None if options is None else options.encode()) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source} on {target}: {os.strerror(errno)}")


def _bind(source, target, read_only):
    """Bind ``source`` (a directory or a file) on ``target``, read-only when asked."""
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o600))
    _mount(source, target, None, _MS_BIND | _MS_REC)
    if read_only:
        locked = os.statvfs(source).f_flag
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV
        flags |= sum(ms for st, ms in _LOCKED_FLAGS if locked & st and ms not in (_MS_NOSUID, _MS_NODEV))
        _mount(None, target, None, flags)


def build_root(root, spec, owner):
    """Make the run's root on the directory ``root`` and pivot into it; the working directory is
    then ``/tmp`` (a tmpfs of ``spec["tmp_bytes"]``, owned by ``owner``). Needs root in a mount
    namespace of this run's own (the mounts die with it). The layout is the one bubblewrap is
    given (``sandbox.root_layout``): ``binds`` (read-only), ``symlinks``, :data:`DEVICES`, /proc."""
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing below propagates back to the host
    _mount("tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1048576,mode=0755")
    for path in spec["binds"]:
        _bind(path, root + path, read_only=True)
    for target, path in spec["symlinks"]:
        os.symlink(target, root + path)
    for device in DEVICES:
        _bind(device, root + device, read_only=False)
    os.mkdir(root + "/proc")
    _mount("proc", root + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    os.mkdir(root + "/tmp")
    _mount("tmpfs", root + "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={int(spec['tmp_bytes'])},mode=0700")
    if owner is not None:
        os.chown(root + "/tmp", *owner)
    _mount(None, root, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    os.chdir(root)
    libc = ctypes.CDLL(None, use_errno=True)
    # pivot_root(".", "."): the old root ends up stacked on the new one, and is detached
    _syscall(libc, _SYS_PIVOT_ROOT[os.uname().machine], b".", b".")
    if libc.umount2(b".", ctypes.c_int(_MNT_DETACH)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"detaching the host's root: {os.strerror(errno)}")
    os.chdir("/tmp")
    return int(spec["tmp_bytes"])


def set_limits(limits):
    applied = {}
    for name, value in (("RLIMIT_CORE", 0), ("RLIMIT_CPU", limits["cpu_s"]),
                        ("RLIMIT_AS", limits["memory_bytes"]), ("RLIMIT_NPROC", limits["nproc"]),
                        ("RLIMIT_FSIZE", limits["fsize_bytes"]), ("RLIMIT_NOFILE", limits["nofile"])):
        if value is None:  # the process count: a pids cgroup caps this run alone
            continue
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
_RET_ALLOW, _RET_EPERM, _RET_ENOSYS = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
# the only socket families: those the network namespace and Landlock confine (AF_VSOCK reaches a
# VM's host from any namespace; AF_UNIX a host service, socketpair's too, by sendto; the rest is
# kernel attack surface)
_SOCKET_FAMILIES = (2, 10)  # AF_INET, AF_INET6
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET: a new user namespace
# gives the run capabilities of its own (fsopen, open_tree, ... then succeed)
_CLONE_NEW = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
# syscall numbers per machine: audit arch, socket and socketpair, clone, clone3, the refused, and
# setsid/setpgid. Refused: unshare, setns; mount, umount2, pivot_root and the new mount API
# (open_tree, move_mount, fsopen, fsconfig, fsmount, fspick, mount_setattr, statmount, listmount,
# open_tree_attr); inotify_init(1), fanotify_init (watches see the names of the host's files);
# io_uring_setup/enter/register; add_key, request_key, keyctl (a key outlives the run);
# fallocate (FALLOC_FL_KEEP_SIZE reserves blocks past RLIMIT_FSIZE on a host filesystem)
_NEW_MOUNT_API = (428, 429, 430, 431, 432, 433, 442, 457, 458, 467)
_SYSCALLS = {
    "x86_64": {"arch": 0xC000003E, "sockets": (41, 53), "clone": 56, "clone3": 435,
               "refused": (272, 308, 165, 166, 155, *_NEW_MOUNT_API, 253, 294, 300, 425, 426, 427,
                           248, 249, 250, 285),
               "group": (112, 109)},
    "aarch64": {"arch": 0xC00000B7, "sockets": (198, 199), "clone": 220, "clone3": 435,
                "refused": (97, 268, 40, 39, 41, *_NEW_MOUNT_API, 26, 262, 425, 426, 427,
                            217, 218, 219, 47),
                "group": (157, 154)},
}


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def seccomp_program(numbers, keep_process_group=False):
    """The BPF program, as (code, jt, jf, k) per instruction. Offsets in struct seccomp_data:
    nr 0, arch 4, args[0] (low word) 16. Jumps are written to labels and resolved at the end
    (a jump of j from instruction i lands on i + 1 + j)."""
    code = []  # (code, jt label or 0, jf label or 0, k)

    def emit(op, k, jt=None, jf=None):
        code.append((op, jt, jf, k))

    emit(_LD_W_ABS, 4)
    emit(_JEQ_K, numbers["arch"], jf="deny")         # another ABI's entry points
    emit(_LD_W_ABS, 0)
    emit(_JGE_K, 0x40000000, jt="deny")              # x32
    for number in numbers["sockets"]:
        emit(_JEQ_K, number, jt="family")
    emit(_JEQ_K, numbers["clone"], jt="clone")
    emit(_JEQ_K, numbers["clone3"], jt="enosys")     # flags behind a pointer: libc falls back to clone
    refused = numbers["refused"] + (numbers["group"] if keep_process_group else ())
    for number in refused:
        emit(_JEQ_K, number, jt="deny")
    emit(_RET_K, _RET_ALLOW)
    labels = {"family": len(code)}
    emit(_LD_W_ABS, 16)
    for family in _SOCKET_FAMILIES:
        emit(_JEQ_K, family, jt="allow")
    emit(_RET_K, _RET_EPERM)
    labels["clone"] = len(code)
    emit(_LD_W_ABS, 16)
    emit(_JSET_K, _CLONE_NEW, jt="deny")
    labels["allow"] = len(code)
    emit(_RET_K, _RET_ALLOW)
    labels["deny"] = len(code)
    emit(_RET_K, _RET_EPERM)
    labels["enosys"] = len(code)
    emit(_RET_K, _RET_ENOSYS)
    program = []
    for i, (op, jt, jf, k) in enumerate(code):
        offsets = [0 if label is None else labels[label] - i - 1 for label in (jt, jf)]
        if not all(0 <= o < 256 for o in offsets):
            raise ValueError("seccomp jump out of range")
        program.append((op, offsets[0], offsets[1], k))
    return program


def apply_seccomp(keep_process_group=False):
    """Install :func:`seccomp_program`; with ``keep_process_group`` it also refuses leaving the
    process group (without a PID namespace, killing the group is what kills everything the run
    started). False where not supported."""
    machine = os.uname().machine
    if machine not in _SYSCALLS:
        return False
    program = seccomp_program(_SYSCALLS[machine], keep_process_group)
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
# values only (never pickle: decoding must not run code). Decoding a reply must cost the
# evaluator time linear in its size, whatever the sandbox sends (it holds the GIL of every
# judging thread): the reply is capped at MAX_REPLY_BYTES (HumanEval's largest canonical reply
# is 259 bytes), the values in it, their nesting and an int's digits are capped, duplicate keys
# are refused, and a set's or dict's members may share a hash only a few at a time (42,000 ints
# that all hash to 0 took 10 s to put in one set).
_TAGS = {"tuple": tuple, "set": set, "frozenset": frozenset}
_ENVELOPES = ("ok", "raised", "ready", "hello", "load_error", "args")
MAX_REPLY_BYTES = 2**16
MAX_VALUES = 2**14  # values (containers and scalars) in one message
MAX_DEPTH = 64
MAX_INT_DIGITS = 1000
MAX_SAME_HASH = 8  # members of one set or dict keys with equal hashes


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


class _Object(dict):
    """A JSON object as parsed, before its tag is read (its keys are unique)."""


def _pairs(pairs):
    if len(pairs) != 1:
        raise ValueError(f"malformed value with keys {sorted(k for k, _ in pairs)!r}")
    return _Object(pairs)


def _parse_int(text):
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an int of more than {MAX_INT_DIGITS} digits")
    return int(text)


def _hashable_members(members):
    """``members`` once each hash is known to be shared by few of them (else ValueError)."""
    counts = {}
    for member in members:
        h = hash(member)  # TypeError for a list or dict in a set: malformed
        counts[h] = counts.get(h, 0) + 1
        if counts[h] > MAX_SAME_HASH:
            raise ValueError(f"more than {MAX_SAME_HASH} members with one hash")
    return members


class _Decoder:
    def __init__(self):
        self.values = 0

    def value(self, node, depth):
        self.values += 1
        if self.values > MAX_VALUES or depth > MAX_DEPTH:
            raise ValueError("a value with too many parts or too deeply nested")
        if isinstance(node, list):
            return [self.value(v, depth + 1) for v in node]
        if not isinstance(node, _Object):
            return node  # str, int, float, bool, None
        (tag, payload), = node.items()
        if tag in _TAGS and isinstance(payload, list):
            members = [self.value(v, depth + 1) for v in payload]
            return _TAGS[tag](members if tag == "tuple" else _hashable_members(members))
        if tag == "dict" and isinstance(payload, list):
            pairs = [self.value(pair, depth + 1) for pair in payload]
            if not all(len(pair) == 2 for pair in pairs):
                raise ValueError("a dict entry that is not a [key, value] pair")
            _hashable_members([k for k, _ in pairs])
            return dict(pairs)
        if tag == "complex" and isinstance(payload, list) and len(payload) == 2 \
                and all(type(x) in (int, float) for x in payload):
            return complex(float(payload[0]), float(payload[1]))
        if tag == "bytes" and isinstance(payload, str):
            return bytes.fromhex(payload)
        raise ValueError(f"unknown value tag {tag!r}")


def decode_message(line, max_bytes=MAX_REPLY_BYTES):
    """A JSON line ``{"<envelope>": payload}`` -> ``{envelope: plain Python values}``; ValueError,
    TypeError, OverflowError or RecursionError when malformed or over a cap. ``max_bytes=None``
    for the evaluator's own (trusted) calls, whose arguments may be larger."""
    if max_bytes is not None and len(line) > max_bytes:
        raise ValueError(f"a message of more than {max_bytes} bytes")
    tree = json.loads(line, object_pairs_hook=_pairs, parse_int=_parse_int)
    if not isinstance(tree, _Object) or next(iter(tree)) not in _ENVELOPES:
        raise ValueError("a message that is not one tagged envelope")
    (tag, payload), = tree.items()
    return {tag: _Decoder().value(payload, 0)}


def encode_message(tag, payload):
    return (json.dumps({tag: payload}, allow_nan=True) + "\n").encode("utf-8")


def _serve(namespace, entry_point, calls_in, calls_out, deadline):
    """Answer calls of ``entry_point`` until the evaluator closes the pipe."""
    function = namespace.get(entry_point)
    if not callable(function):
        write_all(calls_out, encode_message("load_error", f"{entry_point!r} is not defined"), deadline)
        os._exit(1)
    write_all(calls_out, encode_message("ready", True), deadline)
    reader = os.fdopen(calls_in, "rb", buffering=1 << 16)
    while True:
        line = reader.readline()
        if not line:
            os._exit(0)
        call, args = decode_message(line, max_bytes=None)["args"]
        try:
            reply = encode_message("ok", [call, encode_value(function(*args))])
        except BaseException as exc:  # noqa: BLE001 - the candidate's failure, reported as such
            reply = encode_message("raised", [call, f"{type(exc).__name__}: {exc}"[:2000]])
        sys.stdout.flush()
        write_all(calls_out, reply, deadline)


def write_all(fd, data, deadline):
    """Write ``data`` to the non-blocking ``fd`` by ``deadline`` (time.monotonic()); TimeoutError
    after it. A blocking write waits for the reader for ever."""
    view = memoryview(data)
    while view:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the other end did not read in time")
        _, ready, _ = select.select([], [fd], [], left)
        if ready:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                pass


def main():
    request = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    deadline = time.monotonic() + request["limits"]["cpu_s"]
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    report = {"pid": os.getpid(), "landlock_abi": 0, "uid": os.getuid(), "seccomp": False,
              "private_root": False}
    if request.get("root"):
        report["disk_total_bytes"] = build_root(request["workdir"], request["root"], request.get("drop_to"))
        report["private_root"] = True
        workdir = "/tmp"
    else:
        workdir = request["workdir"]
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
        os.set_blocking(calls_out, False)
        write_all(calls_out, encode_message("hello", encode_value(report)), deadline)
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
            sys.stdout.flush()  # what it printed before failing belongs in the output
            traceback.print_exc()
            sys.stderr.flush()
            if serve:
                write_all(calls_out, encode_message("load_error", f"{type(exc).__name__}: {exc}"[:2000]),
                          deadline)
        finally:
            os._exit(1)
    if serve:
        _serve(namespace, entry_point, calls_in, calls_out, deadline)
    os.write(1, ("\n" + PASS_MARKER + nonce + "\n").encode())
    os._exit(0)


if __name__ == "__main__":
    main()
