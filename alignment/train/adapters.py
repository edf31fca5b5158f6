"""LoRA training state: adapters (and fully trained entries such as a value head) as the trainable params, the
base model frozen beside them (FSDP-sharded like a full run's params, quantised for QLoRA), checkpoints holding
only the trainable part, and `checkpoints/lora.json` naming the base so a LoRA run directory loads as a model."""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alignment import sharding
from alignment.checkpoint import Checkpointer
from alignment.models import lora
from alignment.models.lora import LoraSpec
from alignment.train import runtime
from alignment.train import state as train_state
from alignment.train.state import TrainState, _opt_state_shardings, abstract_params

LORA_INFO = "lora.json"  # beside model.json in a LoRA run's checkpoints directory
logger = logging.getLogger(__name__)


def spec_of(config: ml_collections.ConfigDict) -> LoraSpec | None:
    """The run's LoRA spec, or None (no `lora` block, or lora.enabled False)."""
    return LoraSpec.from_config(config.lora) if "lora" in config else None


def _quantized_sharding(kernel_sharding: NamedSharding, q: lora.Quantized) -> lora.Quantized:
    """Shardings of a quantised kernel: int8 codes as the kernel, its scales without the input axes; nf4 blocks
    over the mesh axes of the kernel's first input axis when they divide the block count, else replicated."""
    mesh, spec = kernel_sharding.mesh, tuple(kernel_sharding.spec) + (None,) * q.codes.ndim
    if q.kind == "int8":
        kernel_axes = spec[: q.codes.ndim]
        scale_axes = tuple(None if d == 1 else a for d, a in zip(q.scales.shape, kernel_axes))
        return lora.Quantized(NamedSharding(mesh, PartitionSpec(*kernel_axes)),
                              NamedSharding(mesh, PartitionSpec(*scale_axes)), q.kind, q.shape, q.dtype)
    axis = spec[1]
    names = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
    if q.codes.shape[1] % math.prod(mesh.shape[a] for a in names):
        axis = None
    return lora.Quantized(NamedSharding(mesh, PartitionSpec(spec[0], axis, None)),
                          NamedSharding(mesh, PartitionSpec(spec[0], axis)), q.kind, q.shape, q.dtype)


def state_shardings(model: nn.Module, optimizer: optax.GradientTransformation, mesh: Mesh, rules: dict,
                    init_inputs: tuple, spec: LoraSpec, full: Sequence[str] = ()) -> tuple[TrainState, TrainState]:
    """(abstract state, shardings) of a LoRA run; `full`: top-level params trained whole (a value head)."""
    boxed = abstract_params(model, init_inputs)
    base_shardings = sharding.param_shardings(boxed, mesh, rules)
    boxed_trainable = {**lora.adapter_shapes(boxed, spec), "full": {k: boxed[k] for k in full}}
    trainable_shardings = sharding.param_shardings(boxed_trainable, mesh, rules)
    trainable = nn.meta.unbox(boxed_trainable)
    base = nn.meta.unbox(boxed)
    frozen = jax.eval_shape(lambda p: lora.quantize_frozen(p, spec), base)
    frozen_shardings = dict(base_shardings)
    if spec.quantize != "none":
        frozen_shardings["layers"] = {
            name: _quantized_sharding(base_shardings["layers"][name], frozen["layers"][name])
            if isinstance(frozen["layers"][name], lora.Quantized) else base_shardings["layers"][name]
            for name in frozen["layers"]}
    opt_state = jax.eval_shape(optimizer.init, trainable)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=trainable, opt_state=opt_state,
                          rng=jax.ShapeDtypeStruct((2,), jnp.uint32), frozen=frozen, lora=spec)
    shardings = TrainState(step=replicated, params=trainable_shardings,
                           opt_state=_opt_state_shardings(opt_state, trainable, trainable_shardings, mesh),
                           rng=replicated, frozen=frozen_shardings, lora=spec)
    return abstract, shardings


def frozen_base(config: ml_collections.ConfigDict, model: nn.Module, model_cfg, mesh: Mesh, rules: dict,
                spec: LoraSpec, frozen_shardings: Any, init_inputs: tuple) -> Any:
    """The base weights (`config.init_from`, else the seed's random init), quantised as the spec asks, laid out
    by `frozen_shardings`."""
    boxed = abstract_params(model, init_inputs)
    params = runtime.initial_params(config, model_cfg, nn.meta.unbox(boxed),
                                    sharding.param_shardings(boxed, mesh, rules))
    if params is None:
        init_key = jax.random.split(jax.random.key(config.seed))[0]
        params = jax.jit(lambda k: nn.meta.unbox(model.init(k, *init_inputs)["params"]))(init_key)
    return jax.jit(lambda p: lora.quantize_frozen(p, spec), out_shardings=frozen_shardings)(params)


def initial_trainable(key: jax.Array, abstract: TrainState, frozen: Any) -> dict:
    """Fresh adapters (B = 0) and the fully trained entries copied from the base."""
    adapters = lora.init_adapters(key, {"lora": abstract.params["lora"]}, abstract.lora)
    return {**adapters, "full": {k: frozen[k] for k in abstract.params["full"]}}


def write_lora_info(directory: str, config: ml_collections.ConfigDict, spec: LoraSpec) -> None:
    """`lora.json`: the spec and the base the adapters belong to (so loading the run rebuilds the model)."""
    if jax.process_index() != 0:
        return
    os.makedirs(directory, exist_ok=True)
    base = os.path.abspath(config.init_from) if config.init_from else ""
    info = {"spec": spec.to_dict(), "base": base, "seed": int(config.seed), "model": config.model.to_dict()}
    path = os.path.join(directory, LORA_INFO)
    with open(path + ".tmp", "w") as f:
        json.dump(info, f, indent=2)
    os.replace(path + ".tmp", path)


def init_state(config: ml_collections.ConfigDict, model: nn.Module, model_cfg, optimizer: optax.GradientTransformation,
               mesh: Mesh, rules: dict, init_inputs: tuple, full: Sequence[str] = ()
               ) -> tuple[TrainState, TrainState, TrainState]:
    """(abstract, shardings, fresh state) of a LoRA run: the base from `config.init_from` (or the seed), fresh
    adapters. The abstract state carries the loaded base as its `frozen`, so `Checkpointer.restore(abstract, ...)`
    reads only the adapters and their optimizer state and keeps that base."""
    spec = spec_of(config)
    abstract, shardings = state_shardings(model, optimizer, mesh, rules, init_inputs, spec, full)
    frozen = frozen_base(config, model, model_cfg, mesh, rules, spec, shardings.frozen, init_inputs)

    def fresh(key, frozen):
        init_key, state_key = jax.random.split(key)
        trainable = initial_trainable(init_key, abstract, frozen)
        return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=optimizer.init(trainable),
                          rng=jax.random.key_data(state_key), frozen=None, lora=spec)

    # The base is attached outside the jit: returned from it, it would come back as a second copy.
    state = jax.jit(fresh, out_shardings=shardings.replace(frozen=None))(jax.random.key(config.seed), frozen)
    return abstract.replace(frozen=frozen), shardings, state.replace(frozen=frozen)


def resume_or_init(config: ml_collections.ConfigDict, workdir: str, model: nn.Module, model_cfg,
                   optimizer: optax.GradientTransformation, mesh: Mesh, rules: dict, init_inputs: tuple,
                   full: Sequence[str] = ()) -> tuple[Checkpointer, TrainState, dict | None, TrainState]:
    """(checkpointer, state, data_state, shardings) of a LoRA run: the newest checkpoint's adapters and optimizer
    state on the base from `config.init_from`, else fresh adapters."""
    directory = os.path.join(workdir, "checkpoints")
    checkpointer = Checkpointer(directory, max_to_keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    write_lora_info(directory, config, spec_of(config))
    abstract, shardings, state = init_state(config, model, model_cfg, optimizer, mesh, rules, init_inputs, full)
    if checkpointer.latest_step() is None:
        return checkpointer, state, None, shardings
    state, data_state = checkpointer.restore(abstract, shardings)
    logger.info("resumed LoRA adapters from step %d", int(state.step))
    return checkpointer, state, data_state, shardings


def init_policy(config: ml_collections.ConfigDict, model: nn.Module, model_cfg, optimizer: optax.GradientTransformation,
                mesh: Mesh, rules: dict, workdir: str, init_inputs: tuple) -> tuple[TrainState, Any, TrainState, Any]:
    """(abstract, shardings, state, reference params) of an RL policy. With LoRA the reference is the frozen base
    (adapters off: no copy of the weights) and the run's lora.json is written; else a copy of the initial weights."""
    spec = spec_of(config)
    if spec:
        write_lora_info(os.path.join(workdir, "checkpoints"), config, spec)
        abstract, shardings, state = init_state(config, model, model_cfg, optimizer, mesh, rules, init_inputs)
        return abstract, shardings, state, state.frozen
    abstract, shardings = train_state.state_shardings(model, optimizer, mesh, rules, init_inputs)
    init_params = runtime.initial_params(config, model_cfg, abstract.params, shardings.params)
    state = train_state.init_state(model, optimizer, shardings, config.seed, init_inputs, init_params)
    return abstract, shardings, state, jax.tree.map(jnp.copy, state.params)  # frozen: the policy's starting point


def sampling_params(state: TrainState) -> Any:
    """The policy as the rollout engine takes it: the base bound to the adapters, which the engine folds into its
    own copy of the weights where it makes one (CPU). A quantised base is dequantised first."""
    if state.lora is None or state.lora.quantize == "none":
        return state.model_params()
    return lora.bind(lora.dequantize_tree(state.frozen), state.params, state.lora)


def merge_lora(run: str, output: str, overwrite: bool = False) -> None:
    """A LoRA run's newest adapters folded into its base (W + scale A B), written as an HF checkpoint
    (safetensors + config.json) at `output`; `run`: the run's workdir or its checkpoints directory."""
    from alignment.checkpoint import checkpoint_directory, load_params, read_model_info
    from alignment.models import ModelConfig, Transformer
    from alignment.models.hf import save_hf_checkpoint
    from alignment.models.transformer import dummy_inputs

    directory = checkpoint_directory(run)
    info_path = os.path.join(directory, LORA_INFO)
    if not os.path.isfile(info_path):
        raise FileNotFoundError(f"{info_path} not found: {run} is not a LoRA run")
    with open(info_path) as f:
        info = json.load(f)
    found = read_model_info(directory)
    if found is None:
        raise FileNotFoundError(f"{directory} has no model.json")
    spec, model_cfg = LoraSpec(**info["spec"]), ModelConfig.from_dict(found[0]["model"])
    model = Transformer(model_cfg)
    boxed = abstract_params(model, dummy_inputs())
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    config = ml_collections.ConfigDict({"init_from": info["base"]})
    base = runtime.initial_params(config, model_cfg, nn.meta.unbox(boxed), jax.tree.map(lambda _: one_device,
                                                                                       nn.meta.unbox(boxed)))
    if base is None:
        base = nn.meta.unbox(model.init(jax.random.split(jax.random.key(info["seed"]))[0], *dummy_inputs())["params"])
    full = [k for k in runtime.VALUE_HEAD if model_cfg.value_head]
    abstract = nn.meta.unbox({**lora.adapter_shapes(boxed, spec), "full": {k: boxed[k] for k in full}})
    trainable = load_params(directory, abstract, jax.tree.map(lambda _: one_device, abstract))
    merged = lora.merge(lora.quantize_frozen(base, spec), trainable, spec)
    save_hf_checkpoint(output, model_cfg, jax.device_get(merged), overwrite=overwrite)
