"""The code sandbox on every backend this machine has: programs run, limits kill, output is capped, and nothing
a program does raises. A backend that is absent here is skipped with the reason."""
import logging
import os
import time

import pytest

from alignment.rewards import sandbox

FAST = sandbox.Limits(cpu_seconds=1, wall_seconds=2, memory_bytes=256 << 20, output_bytes=64 << 10)


def _backends(names):
    return [pytest.param(b, marks=pytest.mark.skipif(bool(sandbox.unavailable(b)),
                                                     reason=f"sandbox backend {b}: {sandbox.unavailable(b)}"))
            for b in names]


ALL = _backends(sandbox.BACKENDS)
ISOLATED = _backends(("bwrap", "unshare"))


def _timed(program, backend, limits=FAST, stdin=""):
    start = time.monotonic()
    result = sandbox.run_python(program, limits, stdin=stdin, backend=backend)
    return result, time.monotonic() - start


@pytest.mark.parametrize("backend", ALL)
def test_runs_a_program_with_its_stdin(backend):
    result, _ = _timed("import sys\nprint(sum(map(int, sys.stdin.read().split())))", backend, stdin="2 3\n4")
    assert result.passed and result.status == "passed" and result.reason == ""
    assert result.stdout == "9\n" and result.backend == backend and result.returncode == 0


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("program, status, reason", [
    ("import time\ntime.sleep(60)", "timeout", "wall clock"),  # idle: the wall clock
    ("x = bytearray(2 << 30)", "failed", "MemoryError"),  # RLIMIT_AS
])
def test_limits_stop_programs(backend, program, status, reason):
    result, seconds = _timed(program, backend)
    assert not result.passed and result.status == status and reason in result.reason and seconds < 4


@pytest.mark.parametrize("backend", ALL)
def test_cpu_limit_kills_a_busy_loop(backend):
    # A wall clock far above the CPU limit, so that a loaded machine still shows RLIMIT_CPU at work.
    limits = sandbox.Limits(cpu_seconds=1, wall_seconds=15, memory_bytes=256 << 20)
    result, seconds = _timed("while True:\n    pass", backend, limits)
    assert result.status == "failed" and "CPU time limit" in result.reason and seconds < 15


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_output_is_capped_and_the_program_killed(backend, stream):
    result, seconds = _timed(f"import sys\nwhile True:\n    sys.{stream}.write('x' * 4096)", backend)
    assert result.status == "output_limit" and "65536 bytes" in result.reason
    assert len(result.stdout) + len(result.stderr) <= FAST.output_bytes and seconds < 3


@pytest.mark.parametrize("backend", ALL)
def test_a_child_holding_stdout_does_not_delay_the_result(backend):
    program = "import os, time\nif os.fork() == 0:\n    time.sleep(30)\nelse:\n    print('parent done')"
    result, seconds = _timed(program, backend)
    assert result.passed and result.stdout.startswith("parent done") and seconds < 2


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("program, reason", [
    ("import os\nos.abort()", "SIGABRT"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "SIGKILL"),
    ("def broken(:\n", "SyntaxError"),
    ("raise SystemExit(3)", "exit status 3"),
    ("\udcff = 1", "SyntaxError"),  # not even valid UTF-8 once written
])
def test_crashes_and_garbage_never_raise(backend, program, reason):
    result, _ = _timed(program, backend)
    assert not result.passed and result.status == "failed" and reason in result.reason


@pytest.mark.parametrize("backend", ISOLATED)
def test_scratch_is_the_only_writable_place_and_is_bounded(backend):
    limits = sandbox.Limits(cpu_seconds=1, wall_seconds=3, memory_bytes=256 << 20, file_bytes=1 << 20)
    program = ("import os\nopen('small', 'wb').write(b'x' * 1000)\nprint(os.getcwd(), os.path.getsize('small'))\n"
               "open('big', 'wb').write(b'x' * (2 << 20))")
    result, _ = _timed(program, backend, limits)
    assert result.stdout == "/tmp 1000\n" and not result.passed  # the 2 MiB file exceeds file_bytes
    assert "No space left on device" in result.reason or "File too large" in result.reason


def test_none_backend_scratch_directory_is_removed():
    result, _ = _timed("import os\nopen('out.txt', 'w').write('x')\nprint(os.getcwd())", "none")
    assert result.passed and not os.path.exists(result.stdout.strip())


def test_backend_choice_and_the_logged_downgrade(monkeypatch, caplog):
    assert sandbox.default_backend() in [b for b in sandbox.BACKENDS if not sandbox.unavailable(b)]
    with pytest.raises(ValueError, match="unknown sandbox backend 'jail'"):
        sandbox.unavailable("jail")
    monkeypatch.setattr(sandbox.shutil, "which", lambda name, **kw: None)
    assert "not installed" in sandbox.unavailable.__wrapped__("bwrap")
    monkeypatch.undo()

    monkeypatch.setattr(sandbox, "unavailable", lambda backend: "" if backend == "none" else "not allowed here")
    sandbox.default_backend.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="alignment.rewards.sandbox"):
            assert sandbox.default_backend() == "none"
    finally:
        sandbox.default_backend.cache_clear()
    warning = caplog.records[-1]
    assert warning.levelname == "WARNING" and "no namespaces" in warning.getMessage()
    assert "not allowed here" in warning.getMessage() and "signal this process" in warning.getMessage()
