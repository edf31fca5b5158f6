"""Run untrusted Python (policy-generated code) behind kernel boundaries, with CPU, memory, process, file,
output and wall-clock limits. `run_python` never raises for anything the program does: crashes, hangs, floods
and limit kills all come back as a `SandboxResult` that did not pass, with a one-line `reason`.

Backends, best first; the first that works on this machine is used (`default_backend`), and a downgrade to
"none" is logged once as a WARNING naming what is lost:
  bwrap    bubblewrap (the distribution's package) builds the namespaces and the filesystem view;
  unshare  util-linux `unshare` builds them, with a short shell script of `mount` calls and `pivot_root`;
  none     no namespaces (a machine that allows none): rlimits, a fresh session and a scratch directory only.
As root, bwrap and unshare set up the namespaces owned by the machine's user namespace and then `setpriv`
switches the program to an unused uid drawn per run; otherwise (a laptop user) they run in a new user namespace,
where the program is that namespace's root without any capability.

Which layer stops which attack (bwrap and unshare alike):
  - PID namespace: the program runs in its own, below a PID 1 that only waits for it; it cannot see, signal or
    ptrace its caller or any other process outside (their PIDs do not exist there; kill(-1) reaches only the
    sandbox). When the program exits or is killed, PID 1 exits and the kernel kills every process left in the
    namespace, so a child that called setsid() or holds stdout dies with it.
  - mount namespace + pivot_root: the filesystem is a read-only tmpfs holding only read-only binds of /usr (and
    the /bin, /lib... links), the interpreter's prefix, /etc/ld.so.cache, five device nodes (null, zero, full,
    random, urandom), a fresh /proc of the new PID namespace (the caller's /proc/<pid>/environ does not exist
    there), the program's directory (read-only, at /box) and a scratch tmpfs of `file_bytes` at /tmp, the
    only writable place; it vanishes with the namespace. /etc/passwd, the project, its data and the home
    directories are not there at all.
  - network namespace: only a loopback interface that is down; sockets of any kind (socket, _socket, ctypes
    syscalls) fail to reach anything. IPC and UTS namespaces too.
  - credentials: an unprivileged uid with no capabilities, an empty capability bounding set and no_new_privs
    (setuid binaries cannot raise it), no supplementary groups (as root), its own session (setsid).
  - rlimits (prlimit): CPU seconds, address space per process, file size, open files, no core dumps, and
    processes (RLIMIT_NPROC, which binds because the uid is not root and is used by no other process).
  - the caller: output is read as it arrives and the program is killed past `output_bytes` (stdout and stderr
    together), so the caller's memory stays bounded; everything is killed at `wall_seconds`; the sandbox is
    killed if the caller dies (parent-death signal).
The program runs as `python -S -B`: the standard library, no site-packages. Subprocesses and shells still start,
inside the same boundaries and limits; /proc still shows machine-wide facts (CPU, memory, kernel version).
Out of scope:
  - kernel exploits: the namespaces and the system-call interface are the boundary (there is no seccomp
    filter); as root the program may create user namespaces of its own, which give it no access outside but
    widen the kernel surface it reaches (bwrap without root disables them);
  - side channels (timing, CPU caches), and shared resources beyond the limits above: total memory can reach
    `processes` x `memory_bytes` plus `file_bytes` of tmpfs, and CPU time is limited per process;
  - the "none" backend keeps only the rlimits, the session and the wall/output limits: there the program can
    read what the caller can, reach the network, signal the caller and leave processes behind.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import secrets
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

logger = logging.getLogger(__name__)

BACKENDS = ("bwrap", "unshare", "none")  # in order of preference
# When the caller is root, each run's program gets a uid drawn from this range, which systemd and the usual
# subuid ranges leave unassigned (1879048192 up), so that no other process shares its RLIMIT_NPROC count.
_UID_BASE, _UID_RANGE = 0x70000000, 1 << 24
_DEVICES = ("null", "zero", "full", "random", "urandom")
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


@dataclasses.dataclass(frozen=True)
class Limits:
    cpu_seconds: float = 5.0  # RLIMIT_CPU of each process: SIGXCPU, then SIGKILL a second later
    wall_seconds: float = 10.0  # everything in the sandbox is killed after this long, busy or not
    memory_bytes: int = 1 << 30  # RLIMIT_AS: address space of each process
    file_bytes: int = 16 << 20  # size of the scratch tmpfs (/tmp) and RLIMIT_FSIZE (largest file written)
    processes: int = 16  # RLIMIT_NPROC: processes and threads at once; stops fork bombs
    open_files: int = 64  # RLIMIT_NOFILE
    output_bytes: int = 1 << 20  # stdout + stderr kept; past this the program is killed (status output_limit)


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    passed: bool  # exited with status 0 within every limit
    status: str  # passed | failed (non-zero exit or signal) | timeout | output_limit | error (could not start)
    returncode: int | None
    stdout: str  # at most output_bytes together with stderr (UTF-8, undecodable bytes replaced)
    stderr: str
    seconds: float
    backend: str  # bwrap | unshare | none
    reason: str  # one line on why it did not pass; "" when it passed


# --- the filesystem view ------------------------------------------------------------------------------------

def _interpreter_dirs() -> list[str]:
    """Directories holding this interpreter, its standard library and shared libraries (a venv and its base)."""
    paths = []
    for path in (sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))):
        for p in (os.path.abspath(path), os.path.realpath(path)):
            if p not in paths:
                paths.append(p)
    return paths


def _within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


@functools.lru_cache(maxsize=1)
def _view() -> tuple[tuple[str, ...], ...]:
    """The sandbox's filesystem as steps: ("ro", path) read-only bind, ("dev", path) device bind, ("link",
    target, path) symlink, ("proc", path), ("tmp", path) the scratch tmpfs, ("box", path) the program's
    directory; paths are the same inside and out."""
    # The scratch tmpfs first: an interpreter installed under /tmp is then bound on top of it, not hidden by it.
    steps, mounted = [("tmp", "/tmp"), ("box", "/box"), ("proc", "/proc")], []
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            steps.append(("link", os.readlink(path), path))
        elif os.path.isdir(path):
            steps.append(("ro", path))
            mounted.append(path)
    for path in _interpreter_dirs():
        if os.path.isdir(path) and not any(_within(path, m) for m in mounted):
            steps.append(("ro", path))
            mounted.append(path)
    if os.path.isfile("/etc/ld.so.cache"):
        steps.append(("ro", "/etc/ld.so.cache"))
    steps += [("dev", f"/dev/{d}") for d in _DEVICES if os.path.exists(f"/dev/{d}")]
    return tuple(steps)


def _parents(path: str) -> list[str]:
    """The directories above `path`, outermost first, without "/"."""
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[:i + 1]) for i in range(len(parts))]


def _bwrap_view(program_dir: str, limits: Limits) -> list[str]:
    args, made = [], set()
    for step in _view():
        path = step[-1]
        for parent in _parents(path):  # made explicitly: bwrap would create them with mode 0700
            if parent not in made:
                args += ["--perms", "0755", "--dir", parent]
                made.add(parent)
        made.add(path)
        kind = step[0]
        if kind == "ro":
            args += ["--ro-bind", path, path]
        elif kind == "dev":
            args += ["--dev-bind", path, path]
        elif kind == "link":
            args += ["--symlink", step[1], path]
        elif kind == "proc":
            args += ["--proc", path]
        elif kind == "tmp":
            args += ["--size", str(int(limits.file_bytes)), "--perms", "1777", "--tmpfs", path]
        else:
            args += ["--ro-bind", program_dir, path]
    return args + ["--remount-ro", "/"]


def _mount_script(program_dir: str, root: str, limits: Limits) -> list[str]:
    """Shell lines building the view on a tmpfs at `root` (inside the new mount namespace): the scratch tmpfs,
    then all other mount points in two commands (directories, files), then one line per link and per mount."""
    q, mount = shlex.quote, _tool("mount")
    lines = [f"{mount} -t tmpfs -o size=1m,mode=0755,nosuid,nodev sandbox-root {q(root)}"]
    dirs, files, links, mounts = [], [], [], []
    for step in _view():
        kind, path = step[0], step[-1]
        target = q(root + path)
        source = program_dir if kind == "box" else path
        if kind == "tmp":  # first, so that mount points below it (an interpreter under /tmp) are made inside it
            lines += [f"mkdir {target}",
                      f"{mount} -t tmpfs -o size={int(limits.file_bytes)},mode=1777,nosuid,nodev scratch {target}"]
        elif kind == "link":
            dirs.append(q(root + os.path.dirname(path)))
            links.append(f"ln -s {q(step[1])} {target}")
        else:
            is_file = kind != "proc" and not os.path.isdir(source)
            dirs.append(q(root + os.path.dirname(path)) if is_file else target)
            files += [target] if is_file else []
            options = "-t proc -o nosuid,nodev,noexec proc" if kind == "proc" else (
                f"--bind {q(source)}" if kind == "dev" else f"--bind -o ro,nosuid,nodev {q(source)}")
            mounts.append(f"{mount} {options} {target}")
    lines.append("mkdir -p " + " ".join(dict.fromkeys(dirs)))
    lines += ["touch " + " ".join(files)] if files else []
    return lines + links + mounts


# --- commands -----------------------------------------------------------------------------------------------

def _tool(name: str) -> str:
    path = shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin")
    if path is None:
        package = "bubblewrap" if name == "bwrap" else "util-linux"
        raise RuntimeError(f"the sandbox needs `{name}` ({package}) in /usr/bin, /bin, /usr/sbin or /sbin")
    return path


def _rlimits(limits: Limits) -> list[str]:
    """prlimit arguments; the CPU hard limit a second above the soft one turns SIGXCPU into SIGKILL."""
    cpu = max(1, int(limits.cpu_seconds + 0.999))
    values = {"cpu": (cpu, cpu + 1), "as": (int(limits.memory_bytes),) * 2, "fsize": (int(limits.file_bytes),) * 2,
              "nproc": (int(limits.processes),) * 2, "nofile": (int(limits.open_files),) * 2, "core": (0, 0)}
    return [_tool("prlimit")] + [f"--{name}={soft}:{hard}" for name, (soft, hard) in values.items()] + ["--"]


def _drop(root: bool) -> list[str]:
    """setpriv arguments leaving the program no capability and no way to gain one. As root: an unused uid.
    (Not needed by bwrap without root, which runs the program as the caller's uid, without capabilities.)
    In a user namespace the program stays that namespace's uid 0 (with the caller's groups, which cannot be
    dropped there), so the noroot securebits keep exec from granting it capabilities back."""
    common = ["--no-new-privs", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all"]
    if root:
        uid = _UID_BASE + secrets.randbelow(_UID_RANGE)
        return [_tool("setpriv"), f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *common, "--"]
    bits = "+noroot,+noroot_locked,+no_setuid_fixup,+no_setuid_fixup_locked,+keep_caps_locked"
    return [_tool("setpriv"), f"--securebits={bits}", *common, "--"]


def _command(backend: str, box: str, limits: Limits) -> tuple[list[str], str]:
    """(argv, working directory) running box/program/program.py with `backend`."""
    root = os.geteuid() == 0
    program_dir = os.path.join(box, "program")
    if backend == "none":
        python = [sys.executable, "-S", "-B", os.path.join(program_dir, "program.py")]
        return [_tool("setpriv"), "--pdeathsig=KILL", "--", *_rlimits(limits), *python], program_dir
    python = [sys.executable, "-S", "-B", "/box/program.py"]
    if backend == "bwrap":
        namespaces = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        if not root:  # root keeps the machine's user namespace, so that setpriv can switch to an unused uid
            namespaces += ["--unshare-user", "--disable-userns"]
        # Without root, bwrap itself runs the program under the caller's uid, without capabilities.
        drop = _drop(root) if root else []
        argv = [_tool("bwrap"), *namespaces, "--die-with-parent", "--new-session",
                *_bwrap_view(program_dir, limits), "--chdir", "/tmp", "--", *drop, *_rlimits(limits), *python]
        return argv, box
    mountpoint = os.path.join(box, "root")
    os.mkdir(mountpoint)
    # One command a line: `set -e` stops at the first failure (it would not inside an && list).
    script = "\n".join([
        "set -eu",
        *_mount_script(program_dir, mountpoint, limits),
        f"cd {shlex.quote(mountpoint)}",
        "mkdir .old",
        f"{_tool('pivot_root')} . .old",
        f"{_tool('umount')} -l /.old",  # the host's tree leaves the namespace
        "rmdir /.old",
        f"{_tool('mount')} -o remount,ro,bind /",
        "cd /tmp",
        "unset OLDPWD",  # the host path of the mount point
        # PID 1 is an unprivileged shell waiting for the program, as in bwrap: a namespace's PID 1 ignores
        # signals it has no handler for, which would change how the program meets SIGXCPU or its own alarm().
        "exec " + shlex.join([_tool("setsid"), *_drop(root), "/bin/sh", "-c", '"$@"; exit $?', "sh",
                              *_rlimits(limits), *python]),
    ])
    user = [] if root else ["--user", "--map-root-user"]
    argv = [_tool("setpriv"), "--pdeathsig=KILL", "--", _tool("unshare"), *user, "--pid", "--mount", "--net",
            "--ipc", "--uts", "--kill-child", "--", "/bin/sh", "-c", script]
    return argv, box


# --- running ------------------------------------------------------------------------------------------------

def _environment(home: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1"}


def _supervise(proc: subprocess.Popen, limits: Limits, deadline: float) -> tuple[str, bytes, bytes]:
    """Read stdout and stderr as they arrive until the process exits: ("exited" | "timeout" | "output_limit",
    stdout, stderr), at most output_bytes in all. The process is left unreaped (its pid stays reserved)."""
    kept = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    room = int(limits.output_bytes)
    pidfd = os.pidfd_open(proc.pid)  # readable once the process has exited (Linux 5.3+)
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(pidfd, selectors.EVENT_READ)
            for pipe in kept:
                os.set_blocking(pipe.fileno(), False)
                selector.register(pipe, selectors.EVENT_READ)
            exited = False
            while not exited:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return "timeout", bytes(kept[proc.stdout]), bytes(kept[proc.stderr])
                for key, _ in selector.select(remaining):
                    if key.fileobj == pidfd:
                        exited = True
                        continue
                    data = _read(key.fileobj, room + 1, until_empty=False)
                    if data is None:  # end of file
                        selector.unregister(key.fileobj)
                        continue
                    kept[key.fileobj] += data[:room]
                    room -= len(data)
                    if room < 0:
                        return "output_limit", bytes(kept[proc.stdout]), bytes(kept[proc.stderr])
            # What the program wrote just before exiting; a straggler still holding a pipe is not waited for.
            for pipe in [key.fileobj for key in selector.get_map().values() if key.fileobj != pidfd]:
                data = _read(pipe, room + 1, until_empty=True) or b""
                kept[pipe] += data[:room]
                room -= len(data)
                if room < 0:
                    return "output_limit", bytes(kept[proc.stdout]), bytes(kept[proc.stderr])
    finally:
        os.close(pidfd)
    return "exited", bytes(kept[proc.stdout]), bytes(kept[proc.stderr])


def _read(pipe, limit: int, until_empty: bool) -> bytes | None:
    """Up to `limit` bytes from a non-blocking pipe: one read, or (until_empty) reads until nothing is
    waiting; None at end of file with nothing read."""
    data = bytearray()
    while len(data) < limit:
        try:
            chunk = os.read(pipe.fileno(), min(1 << 16, limit - len(data)))
        except BlockingIOError:
            break
        if not chunk:
            return bytes(data) if data else None
        data += chunk
        if not until_empty:
            break
    return bytes(data)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the process group before reaping its leader, so the group id cannot have been reused."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _reason(status: str, returncode: int | None, stderr: str, limits: Limits, backend: str) -> str:
    if status == "passed":
        return ""
    if status == "timeout":
        return f"timeout: still running after {limits.wall_seconds:g} s (wall clock)"
    if status == "output_limit":
        return f"output_limit: wrote more than {int(limits.output_bytes)} bytes"
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")[:200]
    last = "".join(c if c.isprintable() else "?" for c in last)  # the program's text, bound for logs
    # The namespace's PID 1 (bwrap's, or the shell) reports a program killed by signal N as status 128 + N.
    signum = -returncode if returncode < 0 else returncode - 128 if backend != "none" and returncode > 128 else 0
    if signum:
        name = signal.Signals(signum).name if signum in signal.valid_signals() else str(signum)
        hint = {"SIGXCPU": " (CPU time limit)", "SIGKILL": " (e.g. the CPU time limit's hard stop)"}.get(name, "")
        return f"failed: killed by {name}{hint}" + (f": {last}" if last else "")
    return f"failed: exit status {returncode}" + (f": {last}" if last else "")


def run_python(program: str, limits: Limits = Limits(), stdin: str = "", backend: str | None = None) -> SandboxResult:
    """Run `program` (Python source) as __main__ in the sandbox with `stdin`; exit status 0 means passed.
    `backend` defaults to the best one this machine supports."""
    backend = backend or default_backend()
    start = time.monotonic()
    box = tempfile.mkdtemp(prefix="sandbox-")
    try:
        # Readable by the sandbox's uid: box/program (seen at /box) holds nothing but the program.
        os.chmod(box, 0o755)
        os.mkdir(os.path.join(box, "program"), 0o755)
        for path, text in (("program/program.py", program), ("stdin", stdin)):
            with open(os.path.join(box, path), "w", encoding="utf-8", errors="replace") as f:
                f.write(text)
        command, cwd = _command(backend, box, limits)
        with open(os.path.join(box, "stdin"), "rb") as stdin_file:
            try:
                proc = subprocess.Popen(command, cwd=cwd, env=_environment("/tmp" if backend != "none" else cwd),
                                        stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        start_new_session=True, umask=0o022)
            except OSError as e:
                return SandboxResult(False, "error", None, "", "", 0.0, backend, f"error: could not start: {e}")
        with proc.stdout, proc.stderr:
            try:
                ending, out, err = _supervise(proc, limits, start + limits.wall_seconds)
            finally:
                _kill(proc)
        stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
        status = ending if ending != "exited" else ("passed" if proc.returncode == 0 else "failed")
        return SandboxResult(status == "passed", status, proc.returncode, stdout, stderr, time.monotonic() - start,
                             backend, _reason(status, proc.returncode, stderr, limits, backend))
    finally:
        shutil.rmtree(box, ignore_errors=True)


# --- choosing a backend -------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def unavailable(backend: str) -> str:
    """"" when `backend` runs programs on this machine, else why not (checked once, by running one)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown sandbox backend {backend!r}; choose from {list(BACKENDS)}")
    if backend == "bwrap" and shutil.which("bwrap") is None:
        return "bwrap is not installed (the distribution's bubblewrap package)"
    try:  # the isolated backends must also show the program its own filesystem view
        result = run_python("import os\nprint(42, os.path.isfile('/box/program.py'))", Limits(wall_seconds=20),
                            backend=backend)
    except (OSError, RuntimeError) as e:
        return str(e)
    if result.stdout.strip() != f"42 {backend != 'none'}":
        return result.reason or f"the probe printed {result.stdout[:80]!r}"
    return ""


@functools.lru_cache(maxsize=1)
def default_backend() -> str:
    """The best backend that works here; logged once, as a WARNING when it is "none"."""
    reasons = {}
    for backend in BACKENDS[:-1]:
        reasons[backend] = unavailable(backend)
        if not reasons[backend]:
            logger.info("code sandbox: %s backend (namespaces; %s)", backend, "an unused uid per run"
                        if os.geteuid() == 0 else "in a user namespace, without capabilities")
            return backend
    logger.warning("code sandbox: no namespaces available (%s); programs run with rlimits and a wall clock only: "
                   "they can read every file this process can, use the network, and see and signal this process "
                   "and its other children%s", "; ".join(f"{b}: {r}" for b, r in reasons.items()),
                   "; RLIMIT_NPROC does not bind root, so fork bombs are stopped only by the wall clock"
                   if os.geteuid() == 0 else "")
    return "none"
