"""Run untrusted Python against its tests in a subprocess with CPU, memory, output and wall-clock limits.

Layers, each enough to stop the usual damage on its own:
  - resource limits (setrlimit) on CPU seconds, address space, file size and forked processes;
  - a wall-clock timeout that kills the whole process group (sleeps and blocked I/O use no CPU);
  - no network: a fresh network namespace (`unshare --net`) where the kernel allows it, and always a
    prelude that replaces the socket constructors, and an environment without proxies;
  - a throwaway scratch directory as the working directory and HOME.
`run_python` never raises for anything the program does: hangs, crashes and limit kills all come back as
a failed `SandboxResult`.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

# Runs before the program: network calls fail even where namespaces are unavailable.
_PRELUDE = """\
import socket as _socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the sandbox")
_socket.socket = _no_network
_socket.create_connection = _no_network
_socket.socketpair = _no_network
del _socket, _no_network
"""


@dataclasses.dataclass(frozen=True)
class Limits:
    cpu_seconds: float = 5.0  # RLIMIT_CPU: CPU time before SIGXCPU/SIGKILL
    wall_seconds: float = 10.0  # whole-process-group kill after this long, busy or not
    memory_bytes: int = 1 << 30  # RLIMIT_AS: address space
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE: largest file the program may write
    processes: int = 64  # RLIMIT_NPROC: stops fork bombs (counted per user, so not tiny)
    output_chars: int = 4000  # stdout/stderr kept in the result (tails)


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    passed: bool  # exited with status 0 within the limits
    status: str  # passed | failed | timeout | error
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    network_namespace: bool  # whether the program ran in its own (empty) network namespace


@functools.lru_cache(maxsize=1)
def _unshare_prefix() -> tuple[str, ...]:
    """`unshare` arguments giving an empty network namespace, or () where the kernel refuses them."""
    exe = shutil.which("unshare")
    if not exe:
        return ()
    for prefix in ((exe, "--net"), (exe, "--map-root-user", "--net")):
        try:
            probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return ()


def _set_limits(limits: Limits) -> None:
    """Runs in the child between fork and exec."""
    cpu = max(1, int(limits.cpu_seconds + 0.999))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if os.geteuid() != 0:  # root ignores RLIMIT_NPROC, and lowering it for root would be pointless
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))


def _tail(data: bytes, chars: int) -> str:
    return data.decode("utf-8", errors="replace")[-chars:]


def run_python(program: str, limits: Limits = Limits(), stdin: str = "") -> SandboxResult:
    """Run `program` (Python source) in the sandbox; exit status 0 means passed."""
    start = time.monotonic()
    prefix = _unshare_prefix()
    scratch = tempfile.mkdtemp(prefix="sandbox-")
    try:
        path = os.path.join(scratch, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(_PRELUDE + "\n" + program)
        env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "PYTHONHASHSEED": "0",
               "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
        # -I: isolated mode, so neither the user's site-packages nor PYTHON* variables leak in.
        command = [*prefix, sys.executable, "-I", path]
        try:
            proc = subprocess.Popen(command, cwd=scratch, env=env, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                    preexec_fn=functools.partial(_set_limits, limits))
        except OSError as e:
            return SandboxResult(False, "error", None, "", f"could not start: {e}", 0.0, bool(prefix))
        try:
            out, err = proc.communicate(stdin.encode(), timeout=limits.wall_seconds)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            status = "timeout"
        return SandboxResult(status == "passed", status, proc.returncode, _tail(out, limits.output_chars),
                             _tail(err, limits.output_chars), time.monotonic() - start, bool(prefix))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_tests(solution: str, tests: str, limits: Limits = Limits()) -> SandboxResult:
    """Run a solution followed by its test code (asserts); passes when nothing raised."""
    return run_python(solution + "\n\n" + tests + "\n", limits)
