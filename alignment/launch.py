"""Command line entry point: resolve the config, pick the stage, run it.

    python -m alignment.launch --config=configs/sft.py --workdir=/tmp/run [--config.key=value ...] [--dry_run]
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from alignment import config as config_lib
from alignment.train.loop import Preempted

logger = logging.getLogger("alignment.launch")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file (configs/<stage>.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the resolved config, mesh and parameter count; exit.")

# Environment variables that mean this process is one of several (TPU pods and SLURM set their own).
_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def maybe_initialize_distributed() -> None:
    """Join the multi-controller runtime when the environment describes several processes."""
    import jax

    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
    if slurm or tpu_pod or any(os.environ.get(k) for k in _MULTI_PROCESS_ENV):
        jax.distributed.initialize()
        logger.info("process %d of %d", jax.process_index(), jax.process_count())


def dry_run(config) -> str:
    """The resolved config, the mesh and the parameter count, as printed by --dry_run."""
    from alignment.train import runtime

    model_cfg = runtime.model_config(config)
    mesh, _ = runtime.mesh_and_rules(config)
    return "\n".join([
        str(config),
        f"mesh: {dict(mesh.shape)} over {mesh.devices.size} {mesh.devices.flat[0].platform} device(s)",
        f"parameters: {model_cfg.num_params():,}",
    ])


def configure_logging(argv: list[str]) -> None:
    """Project messages at INFO on stderr; libraries (orbax, jax) only at WARNING unless -v/--verbosity."""
    if not any(a.startswith(("--verbosity", "-v")) for a in argv[1:]):
        absl_logging.set_verbosity(absl_logging.WARNING)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    project = logging.getLogger("alignment")
    project.handlers[:] = [handler]
    project.setLevel(logging.INFO)
    project.propagate = False


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    config_lib.validate(config)
    if _DRY_RUN.value:
        print(dry_run(config))
        return
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required (checkpoints, metrics and outputs go there)")
    maybe_initialize_distributed()
    os.makedirs(_WORKDIR.value, exist_ok=True)
    with open(os.path.join(_WORKDIR.value, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=2, default=str)
    stage = importlib.import_module(config_lib.STAGES[config.stage])
    try:
        stage.run(config, _WORKDIR.value)
    except Preempted as e:
        logger.warning("%s", e)  # a clean exit: the scheduler restarts the job, which resumes


def _check_overrides(argv: list[str]) -> None:
    """Fail on a misspelled `--config.key` with the nearest valid key, before absl's own traceback."""
    paths = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    if not paths:
        return
    try:
        config_lib.check_override_keys(config_lib.load_config_file(paths[-1].split(":")[0]), argv)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


def run() -> None:
    _check_overrides(sys.argv)
    configure_logging(sys.argv)
    try:
        app.run(main)
    except ValueError as e:  # configuration and input errors carry their own location; no JAX traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    run()
