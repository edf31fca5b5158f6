"""Setup shared by the training stages: model config, initial weights, mesh, state, batch placement."""
from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding

from alignment import sharding
from alignment.checkpoint import Checkpointer, checkpoint_directory, read_model_info
from alignment.models import ModelConfig, Transformer, from_hf_config
from alignment.models.config import resolve_compute_dtype
from alignment.train.state import init_state

# Fields of config.model that describe how to run a model rather than its architecture; they apply on
# top of an imported checkpoint's own config.
RUNTIME_FIELDS = ("param_dtype", "dtype", "attention_impl", "logprob_impl", "remat_policy", "remat_group_size",
                  "scan_layers", "value_head")
VALUE_HEAD = ("value_kernel", "value_bias")  # the parameters a value head adds to the trunk

logger = logging.getLogger(__name__)


def is_hf_checkpoint(path: str) -> bool:
    """An HF model directory: config.json beside safetensors weights (a run's workdir has a config.json too)."""
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(path) and any(
        name.endswith((".safetensors", ".safetensors.index.json")) for name in os.listdir(path))


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The architecture of the checkpoint `config.init_from` names (an HF config.json, or the model.json of this
    project's checkpoints), else `config.model`; config.model's RUNTIME_FIELDS apply on top either way. A dtype of
    'auto' is resolved here, for the hardware this process runs on, before any model is built."""
    fields = config.model.to_dict()
    if "dtype" in fields:
        fields["dtype"] = resolve_compute_dtype(fields["dtype"])
    runtime = {k: fields[k] for k in RUNTIME_FIELDS if k in fields}
    if config.init_from and is_hf_checkpoint(config.init_from):
        return from_hf_config(config.init_from, **runtime)
    found = read_model_info(checkpoint_directory(config.init_from)) if config.init_from else None
    if found is not None:
        return ModelConfig.from_dict({**found[0]["model"], **runtime})
    return ModelConfig.from_dict(fields)


def setup_model(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None):
    """(model config, Transformer, mesh, rules) of a training stage, with the run header logged; the mesh spans
    `devices` (default: all)."""
    model_cfg = model_config(config)
    mesh, rules = mesh_and_rules(config, devices)
    log_run_header(config, model_cfg, mesh)
    return model_cfg, Transformer(model_cfg), mesh, rules


def mesh_and_rules(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
                   ) -> tuple[Mesh, dict]:
    rules = dict(sharding.DEFAULT_RULES)
    for key, value in config.sharding_rules.items():
        rules[key] = tuple(value) if isinstance(value, (list, tuple)) else value
    return sharding.make_mesh(config.mesh.to_dict(), devices), rules


def initial_params(config: ml_collections.ConfigDict, model_cfg: ModelConfig, abstract_params: Any,
                   param_shardings: Any) -> Any | None:
    """Weights named by `config.init_from` (HF safetensors or an Orbax checkpoint), or None for random init."""
    if not config.init_from:
        return None
    if is_hf_checkpoint(config.init_from):
        from alignment.models.hf import load_hf_checkpoint

        _, params = load_hf_checkpoint(config.init_from, model_cfg)
        return jax.device_put(params, param_shardings)
    from alignment.checkpoint import load_params

    head = [k for k in VALUE_HEAD if k in abstract_params]
    if head and not _has_value_head(config.init_from):
        # A policy checkpoint (SFT, merge) under a value head starting at zero, as from HF weights: a reward model
        # starts from the policy whose answers it learns to score.
        trunk = {k: v for k, v in abstract_params.items() if k not in head}
        params = load_params(config.init_from, trunk, {k: param_shardings[k] for k in trunk})
        logger.info("%s has no value head: it starts at zero", config.init_from)
        return {**params, **{k: jax.device_put(np.zeros(abstract_params[k].shape, abstract_params[k].dtype),
                                               param_shardings[k]) for k in head}}
    return load_params(config.init_from, abstract_params, param_shardings)


def _has_value_head(path: str) -> bool:
    """Whether the checkpoint's model.json says it holds a value head (one without model.json is taken as is)."""
    found = read_model_info(checkpoint_directory(path))
    return found is None or bool(found[0]["model"].get("value_head", False))


def resume_or_init(config: ml_collections.ConfigDict, workdir: str, model, model_cfg: ModelConfig, optimizer,
                   abstract, shardings, init_inputs: tuple):
    """(checkpointer, state, data_state): the newest checkpoint in workdir/checkpoints when there is one
    (data_state is what was saved with it), else a fresh state from `config.init_from` or the seed (None)."""
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint.keep,
                                async_save=config.checkpoint.async_save)
    if checkpointer.latest_step() is not None:
        state, data_state = checkpointer.restore(abstract, shardings)
        logger.info("resumed from step %d", int(state.step))
        return checkpointer, state, data_state
    params = initial_params(config, model_cfg, abstract.params, shardings.params)
    return checkpointer, init_state(model, optimizer, shardings, config.seed, init_inputs, params), None


def activation_context(mesh: Mesh, rules: dict):
    """Activation sharding annotations for the steps traced inside this context."""
    return sharding.activation_sharding(mesh, rules)


def batch_sharding(mesh: Mesh, rules: dict) -> NamedSharding:
    """Rows over the data axes, sequence over 'sequence'."""
    return sharding.named_sharding(mesh, rules, "batch", "seq")


def place_batch(batch: dict[str, np.ndarray], target: NamedSharding) -> dict[str, jax.Array]:
    """Host rows of this process -> global arrays (every process passes its own slice of the batch)."""
    shards = int(np.prod([target.mesh.shape[axis] for axis in _axes(target.spec[0])]))
    rows = next(iter(jax.tree.leaves(batch))).shape[0] * jax.process_count()
    if rows % shards:
        raise ValueError(f"a batch of {rows} rows cannot be split evenly over the mesh's {shards} data-parallel "
                         f"shards ({' x '.join(_axes(target.spec[0]))}): make the batch size (config.batch_size, "
                         f"for RL rl.prompts_per_step x rl.num_samples) a multiple of {shards}, or change config.mesh")

    def one(x):
        spec = jax.sharding.PartitionSpec(*target.spec[: x.ndim])
        return jax.make_array_from_process_local_data(NamedSharding(target.mesh, spec), x)

    return jax.tree.map(one, batch)


def _axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, a name or a tuple of names)."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def log_run_header(config: ml_collections.ConfigDict, model_cfg: ModelConfig, mesh: Mesh) -> str:
    text = (f"stage={config.get('stage', '')} params={model_cfg.num_params():,} dtype={model_cfg.dtype} "
            f"(parameters {model_cfg.param_dtype}) mesh={dict(mesh.shape)} "
            f"devices={jax.device_count()} ({jax.devices()[0].device_kind}) processes={jax.process_count()}")
    logger.info(text)
    return text
