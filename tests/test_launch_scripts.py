"""The cluster launch scripts print the commands they would run under --dry_run."""
import pathlib
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"


def dry_run(script, *args):
    result = subprocess.run(["bash", str(LAUNCH / script), *args, "--dry_run"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_tpu_pod_creates_installs_and_runs_on_every_worker():
    out = dry_run("tpu_pod.sh", "--name", "pod", "--zone", "us-east5-a", "--accelerator", "v5p-64",
                  "--config", "configs/sft.py", "--workdir", "gs://bucket/run", "--spot")
    lines = out.strip().splitlines()
    assert lines[0].startswith("gcloud compute tpus queued-resources create pod")
    assert "--accelerator-type v5p-64" in lines[0] and "--spot" in lines[0]
    assert any("tpu-vm scp" in line and "--worker=all" in line for line in lines)
    assert "pip\\ install" in lines[-2] and "--worker=all" in lines[-2]
    assert "alignment.launch\\ --config=configs/sft.py\\ --workdir=gs://bucket/run" in lines[-1]


def test_gke_jobset_is_rendered():
    out = dry_run("gke.sh", "--name", "sft", "--image", "img:1", "--tpu-type", "tpu-v5p-slice", "--topology",
                  "4x4x4", "--hosts", "16", "--config", "configs/sft.py", "--workdir", "gs://b/r")
    assert "kind: JobSet" in out and "parallelism: 16" in out and "--config=configs/sft.py" in out
    assert "${" not in out
    assert out.strip().endswith("kubectl apply -f -")


def test_slurm_submits_the_batch_script():
    out = dry_run("slurm.sh", "--nodes", "4", "--config", "configs/sft.py", "--workdir", "/runs/a")
    assert "sbatch --nodes 4" in out and "slurm.sbatch" in out and "CONFIG=configs/sft.py" in out


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gke.sh", "slurm.sh"])
def test_missing_arguments_are_named(script):
    result = subprocess.run(["bash", str(LAUNCH / script), "--dry_run"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "error:" in result.stderr
