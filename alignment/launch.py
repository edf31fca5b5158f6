"""Command line entry point: resolve the config, pick the stage, run it.

    python -m alignment.launch --config=configs/sft.py --workdir=/tmp/run [--config.key=value ...] [--dry_run]
"""
from __future__ import annotations

import logging
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from alignment import config as config_lib
from alignment import stages
from alignment.train import runtime
from alignment.train.loop import Preempted, TooManyBadSteps

logger = logging.getLogger("alignment.launch")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file (configs/<stage>.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the resolved config, mesh and parameter count; exit.")

_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for multi-process runs outside TPU pods and SLURM.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout_s", 100,
                                  "A process silent this long fails the whole job instead of hanging it.")


def distributed_arguments() -> dict | None:
    """jax.distributed.initialize arguments when this process is one of several, else None.

    Explicit flags (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID) win; TPU pods and
    SLURM jobs are detected by JAX itself from their own environment.
    """
    address = _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        count = _NUM_PROCESSES.value or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
        index = _PROCESS_ID.value if _PROCESS_ID.value is not None else int(os.environ.get("JAX_PROCESS_ID", "-1"))
        if count < 1 or index < 0:
            raise ValueError("a coordinator address needs --num_processes and --process_id "
                             "(or JAX_NUM_PROCESSES and JAX_PROCESS_ID)")
        return dict(coordinator_address=address, num_processes=count, process_id=index)
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
    return {} if slurm or tpu_pod else None


def maybe_initialize_distributed() -> None:
    """Join JAX's multi-controller runtime when the flags or the environment describe several processes."""
    arguments = distributed_arguments()
    if arguments is None:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes need a collectives backend
    jax.distributed.initialize(**arguments, heartbeat_timeout_seconds=_HEARTBEAT.value)
    logger.info("process %d of %d, %d local devices", jax.process_index(), jax.process_count(),
                jax.local_device_count())


def dry_run(config) -> str:
    """The resolved config, and for stages with a model its mesh and parameter count, as --dry_run prints."""
    lines = [str(config)]
    if "model" in config:
        model_cfg = runtime.model_config(config)
        lines.append(f"parameters: {model_cfg.num_params():,}")
    if "mesh" in config:
        mesh, _ = runtime.mesh_and_rules(config)
        lines.append(f"mesh: {dict(mesh.shape)} over {mesh.devices.size} {mesh.devices.flat[0].platform} device(s)")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    stages.check(config)
    maybe_initialize_distributed()
    if _DRY_RUN.value:
        print(dry_run(config))
        return
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required (checkpoints, metrics and outputs go there)")
    try:
        stages.run(config.stage, config, _WORKDIR.value)
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
    config_lib.configure_logging(sys.argv)  # project INFO; libraries' only with -v/--verbosity
    try:
        app.run(main)
    except (ValueError, FileNotFoundError, TooManyBadSteps) as e:  # they name their key, file or step
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    run()
