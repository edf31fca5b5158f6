"""The command line: dry run, typo suggestions, a real SFT run with metrics and a profiler trace, and
SIGTERM -> checkpoint -> resume giving exactly the params of an uninterrupted run."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["--config.batch_size=4", "--config.data.num_embedded=64", "--config.data.num_embedded_eval=8",
         "--config.data.max_length=64", "--config.log_every=1", "--config.checkpoint.async_save=false"]


def launch(*args, workdir=None, wait=True):
    cmd = [sys.executable, "-m", "alignment.launch", "--config=configs/sft.py", *args]
    if workdir is not None:
        cmd.append(f"--workdir={workdir}")
    env = dict(os.environ, XLA_FLAGS="")  # one CPU device, like a laptop
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def final_params(workdir, step):
    restored = ocp.StandardCheckpointer().restore(pathlib.Path(workdir, "checkpoints", str(step), "state").resolve())
    return restored["params"]


def test_dry_run_prints_config_mesh_and_parameter_count():
    result = launch("--dry_run", "--config.mesh.data=1")
    assert result.returncode == 0, result.stderr
    assert "parameters: 1,049,728" in result.stdout
    assert "mesh: {'data': 1" in result.stdout
    assert "stage: sft" in result.stdout


def test_misspelled_key_suggests_nearest():
    result = launch("--dry_run", "--config.optimizer.lrr=0.1")
    assert result.returncode != 0
    assert "unknown config key 'optimizer.lrr'. Did you mean 'optimizer.lr'?" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = launch("--config.steps=120", *SMALL, "--config.profile.enabled=true",
                    "--config.profile.start_step=2", "--config.profile.num_steps=2", workdir=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    return workdir


def test_run_writes_metrics_tensorboard_summary_and_trace(uninterrupted):
    records = [json.loads(line) for line in open(uninterrupted / "metrics.jsonl")]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 121))
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "mfu", "data_wait_s", "step_s"):
        assert np.isfinite(train[-1][key]), key
    assert train[-1]["loss"] < train[0]["loss"]
    assert list((uninterrupted / "tensorboard").glob("events.out.tfevents.*"))
    assert list((uninterrupted / "profile").rglob("*.xplane.pb")), "no profiler trace written"
    summary = json.load(open(uninterrupted / "summary.json"))
    assert summary["data"]["math"]["read"] == 64 and summary["data"]["math"]["truncated"] == 0


def test_sigterm_checkpoints_and_resume_is_exact(tmp_path, uninterrupted):
    process = launch("--config.steps=120", *SMALL, workdir=tmp_path, wait=False)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().strip()):
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output
    stopped = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert 0 < stopped < 120, f"expected to stop early, stopped at {stopped}"
    assert "preempted after step" in output

    resumed = launch("--config.steps=120", *SMALL, workdir=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from step {stopped}" in resumed.stderr
    expected, actual = final_params(uninterrupted, 120), final_params(tmp_path, 120)
    for name in expected["layers"]:
        np.testing.assert_array_equal(actual["layers"][name], expected["layers"][name], err_msg=name)
    np.testing.assert_array_equal(actual["embed"], expected["embed"])
