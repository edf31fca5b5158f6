"""Hostile solutions, run for real: each attack from the sandbox issue plus the classic resource attacks. On the
isolated backends (bwrap, unshare) nothing escapes: the caller and its other processes live, nothing is written
outside the sandbox's scratch, the caller's environment and files stay unread, no socket reaches the caller, no
process outlives the call, and every verdict is 'failed' with a reason. The "none" backend, which has no
isolation by design, runs only the attacks it still has to stop (limits, output, forged results)."""
import os
import secrets
import socket
import subprocess
import sysconfig
import threading
import time
from pathlib import Path

import pytest

from alignment.rewards import registry, sandbox, verdict
from tests import REPO

LIMITS = sandbox.Limits(cpu_seconds=1, wall_seconds=2, memory_bytes=256 << 20, processes=16, output_bytes=64 << 10)
SUITE = verdict.code_suite(["assert add(1, 2) == 3", "assert add(20, 22) == 42"], "hostile")
PROJECT = REPO
SITE = sysconfig.get_paths()["purelib"]
CANARY = "canary-" + secrets.token_hex(8)  # in the caller's environment while the corpus runs
WRONG = "\ndef add(a, b):\n    return 0\n"

# name -> (solution, needs isolation); {placeholders} are filled from the `world` fixture.
ATTACKS = {
    # The caller and its other processes.
    "kill_parent": ("import os\nos.kill(os.getppid(), 9)" + WRONG, True),
    "kill_caller_by_pid": ("import os\nfor pid in ({caller}, {sentinel}):\n    try:\n        os.kill(pid, 9)\n"
                           "    except OSError:\n        pass" + WRONG, True),
    "kill_everything": ("import os\nos.kill(-1, 9)\nos.kill(0, 9)" + WRONG, True),
    # Secrets and files.
    "read_caller_environ": ("def add(a, b):\n    return open('/proc/{caller}/environ').read()", True),
    "read_own_environ": ("import os\ndef add(a, b):\n    return os.environ.get('SANDBOX_CANARY')", False),
    "read_files": ("def add(a, b):\n    return open('/etc/passwd').read() + open('{project}/README.md').read()", True),
    "read_expected_outputs": ("def add(a, b):\n    return open('{project}/tests/fixtures/eval/humaneval_small.jsonl')"
                              ".read()", True),
    "write_outside_scratch": ("for path in ['{outside}/marker', '{project}/pwned', '{site}/pwned.pth', '/usr/pwned',\n"
                              "             '/box/pwned', '/pwned', '/proc/pwned']:\n    try:\n"
                              "        open(path, 'w').write('x')\n    except OSError:\n        pass" + WRONG, True),
    "subprocess_shell": ("import subprocess\nsubprocess.run(['sh', '-c', 'echo x > {outside}/shell; kill -9 {caller} "
                         "{sentinel}'])" + WRONG, True),
    "nested_namespace_remount": ("import subprocess\nsubprocess.run(['unshare', '-rm', 'sh', '-c', 'mount -o "
                                 "remount,rw /usr; mount -o remount,rw,bind /box; echo x > /usr/pwned; echo x > "
                                 "/box/pwned; echo x > {outside}/ns'])" + WRONG, True),
    # Outliving the call.
    "setsid_escape": ("import os\nif os.fork() == 0:\n    os.setsid()\n    os.execv('/bin/sh', ['sh', '-c', "
                      "'sleep 30; echo late > {outside}/late # {token}'])" + WRONG, True),
    "hold_stdout": ("import os\nif os.fork() == 0:\n    os.execv('/bin/sh', ['sh', '-c', 'sleep 30 # {token}'])"
                    + WRONG, False),
    # Forged verdicts.
    "print_results": ("import os\nprint('[0, \"value\", 3]')\nprint('[1, \"value\", 42]', flush=True)\nos._exit(0)",
                      False),
    "write_results_channel": ("import os\nos.write(3, b'[0, \"value\", 1000]\\n[1, \"value\", 1000]\\n')\nos._exit(0)",
                              False),
    "atexit_results": ("import atexit, os\natexit.register(os.write, 3, b'[0, \"value\", 3]\\n')\n"
                       "def add(a, b):\n    return a + b", False),
    "patch_the_harness": ("import json\njson.dumps = lambda *a, **k: '[0, \"value\", 1000]'" + WRONG, False),
    "equal_to_everything": ("class Anything:\n    def __eq__(self, other):\n        return True\n"
                            "def add(a, b):\n    return Anything()", False),
    "int_subclass": ("class Three(int):\n    def __eq__(self, other):\n        return True\n"
                     "def add(a, b):\n    return Three(0)", False),
    "exit_before_tests": ("import sys\nsys.exit(0)", False),
    # Resources.
    "fork_bomb": ("import os\nwhile True:\n    os.fork()", True),
    "infinite_loop": ("def add(a, b):\n    while True:\n        pass", False),
    "deep_recursion": ("import sys\nsys.setrecursionlimit(10 ** 7)\ndef add(a, b):\n    return add(a, b)", False),
    "huge_allocation": ("x = bytearray(8 << 30)" + WRONG, False),
    "flood_stdout": ("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", False),
    "flood_results_channel": ("import os\nwhile True:\n    os.write(3, b'[' * 65536)", False),
    # The network, through every door.
    "socket_module": ("import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)" + WRONG, True),
    "raw_socket": ("import _socket\ns = _socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))"
                   + WRONG, True),
    "ctypes_socket": ("import ctypes, struct\nlibc = ctypes.CDLL(None, use_errno=True)\nfd = libc.socket(2, 1, 0)\n"
                      "address = struct.pack('=H', 2) + struct.pack('!H', {port}) + bytes([127, 0, 0, 1, 0, 0, 0, 0, "
                      "0, 0, 0, 0])\nassert libc.connect(fd, address, 16) == 0, ctypes.get_errno()" + WRONG, True),
    "internet": ("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)" + WRONG, True),
}


class World:
    """What the attacks aim at: the caller, a sibling process, a directory outside, a server on loopback."""

    def __init__(self, outside: Path):
        self.outside = outside
        self.sentinel = subprocess.Popen(["sleep", "600"])
        self.server = socket.create_server(("127.0.0.1", 0))
        self.connections = []
        threading.Thread(target=self._accept, daemon=True).start()
        self.token = "token-" + secrets.token_hex(8)
        self.fields = {"caller": os.getpid(), "sentinel": self.sentinel.pid, "outside": outside, "project": PROJECT,
                       "site": SITE, "port": self.server.getsockname()[1], "token": self.token}

    def _accept(self):
        while True:
            try:
                self.connections.append(self.server.accept())
            except OSError:
                return

    def outliving_processes(self) -> list[str]:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if self.token.encode() in command:
                found.append(command.decode(errors="replace"))
        return found

    def close(self):
        self.sentinel.kill()
        self.sentinel.wait()
        self.server.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    os.environ["SANDBOX_CANARY"] = CANARY
    world = World(tmp_path_factory.mktemp("outside"))
    yield world
    world.close()
    del os.environ["SANDBOX_CANARY"]


def _cases():
    for backend in sandbox.BACKENDS:
        why = sandbox.unavailable(backend)
        for name, (_, isolated) in ATTACKS.items():
            marks = []
            if why:
                marks = [pytest.mark.skip(reason=f"sandbox backend {backend}: {why}")]
            elif backend == "none" and isolated:
                marks = [pytest.mark.skip(reason="the none backend has no isolation, by design")]
            yield pytest.param(backend, name, marks=marks, id=f"{backend}-{name}")


@pytest.mark.parametrize("backend, attack", _cases())
def test_attack_fails_and_nothing_escapes(backend, attack, world):
    solution = ATTACKS[attack][0].format(**world.fields)
    start = time.monotonic()
    outcome = verdict.judge(solution, SUITE, LIMITS, backend=backend)
    seconds = time.monotonic() - start

    assert outcome.status == "failed" and outcome.passed == 0 and outcome.reason, outcome
    assert CANARY not in outcome.reason and "root:" not in outcome.reason
    assert seconds < LIMITS.wall_seconds + 2  # the call returns on time, whatever the program holds
    assert world.sentinel.poll() is None  # the caller's other process lives (and so does the caller)
    deadline = time.monotonic() + 1
    while world.outliving_processes() and time.monotonic() < deadline:
        time.sleep(0.05)  # a killed namespace takes a moment to empty
    assert world.outliving_processes() == []
    written = [p for p in (PROJECT / "pwned", Path(SITE) / "pwned.pth", Path("/usr/pwned"), Path("/pwned"))
               if p.exists()]
    assert written == [] and list(world.outside.iterdir()) == []
    assert world.connections == []


@pytest.mark.parametrize("backend", [b for b in ("bwrap", "unshare")])
def test_code_reward_stays_in_range_under_attack(backend, monkeypatch):
    if sandbox.unavailable(backend):
        pytest.skip(f"sandbox backend {backend}: {sandbox.unavailable(backend)}")
    monkeypatch.setattr(sandbox, "default_backend", lambda: backend)
    sample = registry.Sample("p", [], "", {"tests": ["assert add(1, 2) == 3", "assert add(20, 22) == 42"]})
    params = {"cpu_seconds": 1, "wall_seconds": 2, "memory_bytes": 256 << 20}
    for attack in ("print_results", "write_results_channel", "atexit_results", "patch_the_harness"):
        forged = registry.Sample("p", [], ATTACKS[attack][0], sample.record)
        assert registry.code_reward(forged, params) == 0.0
    honest = registry.Sample("p", [], "def add(a, b):\n    return a + b", sample.record)
    assert registry.code_reward(honest, params) == 1.0
