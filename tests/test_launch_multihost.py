"""Multi-process runs on CPU: 2 processes x 4 devices train like 1 process x 8 devices, and a process
that dies makes the job fail fast instead of hanging."""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
ARGS = ["--config=configs/sft.py", "--config.steps=4", "--config.batch_size=8", "--config.log_every=1",
        "--config.data.num_embedded=64", "--config.data.num_embedded_eval=16", "--config.data.packing=false",
        "--config.data.max_length=64", "--config.checkpoint.async_save=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(workdir, devices: int, extra=(), process=None, processes=1, port=None, steps_args=()):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable, "-m", "alignment.launch", *ARGS, *steps_args, f"--workdir={workdir}", *extra]
    if process is not None:
        cmd += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}", f"--process_id={process}",
                "--heartbeat_timeout_s=10"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def train_losses(workdir) -> list[float]:
    records = [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]
    return [r["loss"] for r in records if r["split"] == "train"]


def test_two_processes_match_one(tmp_path):
    single = start(tmp_path / "single", devices=8)
    assert single.wait(timeout=300) == 0, single.stdout.read()
    port = free_port()
    workers = [start(tmp_path / "multi", devices=4, process=i, processes=2, port=port) for i in range(2)]
    for worker in workers:
        assert worker.wait(timeout=300) == 0, worker.stdout.read()
    expected, actual = train_losses(tmp_path / "single"), train_losses(tmp_path / "multi")
    assert len(expected) == 4
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_dead_process_fails_the_job_fast(tmp_path):
    port = free_port()
    long_run = ["--config.steps=100000"]
    workers = [start(tmp_path, devices=4, process=i, processes=2, port=port, steps_args=long_run) for i in range(2)]
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().strip()):
        assert time.time() < deadline, "training never started"
        assert all(w.poll() is None for w in workers), workers[0].stdout.read()
        time.sleep(0.2)
    workers[1].send_signal(signal.SIGKILL)
    start_wait = time.time()
    try:
        code = workers[0].wait(timeout=120)
    except subprocess.TimeoutExpired:
        workers[0].kill()
        pytest.fail("the surviving process hung after its peer died")
    output = workers[0].stdout.read()
    assert code != 0
    assert time.time() - start_wait < 120
    assert any(word in output.lower() for word in ("heartbeat", "disconnect", "unavailable", "failed", "error")), \
        output[-2000:]
