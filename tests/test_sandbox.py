"""The code sandbox: passing code passes; loops, memory hogs, sockets and crashes score 0 quickly."""
import time

import pytest

from alignment.rewards import sandbox

FAST = sandbox.Limits(cpu_seconds=1, wall_seconds=3, memory_bytes=256 << 20)


def _timed(program):
    start = time.monotonic()
    result = sandbox.run_python(program, FAST)
    return result, time.monotonic() - start


def test_passing_program():
    result = sandbox.run_tests("def add(a, b):\n    return a + b", "assert add(2, 3) == 5", FAST)
    assert result.passed and result.status == "passed"


def test_failing_assertion():
    result = sandbox.run_tests("def add(a, b):\n    return a - b", "assert add(2, 3) == 5", FAST)
    assert not result.passed and "AssertionError" in result.stderr


@pytest.mark.parametrize("program", [
    "while True:\n    pass",  # CPU-bound: RLIMIT_CPU
    "import time\ntime.sleep(60)",  # idle: the wall clock
])
def test_hanging_programs_are_killed(program):
    result, seconds = _timed(program)
    assert not result.passed and seconds < 6


def test_memory_hog_fails():
    result, seconds = _timed("x = bytearray(2 << 30)\nprint(len(x))")
    assert not result.passed and "MemoryError" in result.stderr and seconds < 6


@pytest.mark.parametrize("program", [
    "import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 9))",
    "import socket\nsocket.create_connection(('example.com', 80), timeout=2)",
    "import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', 9))",  # below the patched module
])
def test_network_is_unavailable(program):
    result, seconds = _timed(program)
    assert not result.passed and seconds < 6


def test_crash_and_garbage_never_raise():
    for program in ("import os\nos.abort()", "def broken(:\n", "raise SystemExit(3)"):
        result, _ = _timed(program)
        assert not result.passed and result.status == "failed"


def test_scratch_directory_is_private_and_removed():
    result = sandbox.run_python("import os\nopen('out.txt', 'w').write('x')\nprint(os.getcwd())", FAST)
    assert result.passed
    import os
    assert not os.path.exists(result.stdout.strip())
