"""A model to run, from a stage-style config or a checkpoint directory: model config, weights on the config's mesh
(or one device), tokenizer, chat template, and a rollout engine over them.

Every user of a trained model loads it here: generation, evaluation, serving, the PAS model, PAS's embedder and the
reward model's scorer. A checkpoint of this project brings its architecture, tokenizer and template
(`checkpoints/model.json`, `alignment.data.model_info`); an HF directory its config.json and tokenizer files; with
no checkpoint the weights are a random init from `config.seed`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from absl import logging
from jax.sharding import Mesh

from alignment import sharding
from alignment.checkpoint import checkpoint_directory
from alignment.data import model_info
from alignment.data.tokenizer import Tokenizer, checked_tokenizer
from alignment.generation.engine import Engine
from alignment.generation.text import stop_token_ids
from alignment.models import ModelConfig, Transformer
from alignment.models.transformer import dummy_inputs
from alignment.train import runtime
from alignment.train.state import abstract_params


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    model: Transformer
    params: Any  # laid out on `mesh` (or one device)
    tokenizer: Tokenizer
    chat_template: str
    mesh: Mesh
    rules: dict
    max_length: int  # the sequence length it was trained at (model.json), else its position limit


def checkpoint_config(path: str, **fields) -> ml_collections.ConfigDict:
    """The stage-style config of the checkpoint `path` (a run's workdir, its checkpoints directory, a step
    directory or an HF directory) on all local devices; `fields` (e.g. model={"value_head": True}) apply on top."""
    config = ml_collections.ConfigDict(dict(
        init_from=checkpoint_directory(path), model={}, tokenizer="", chat_template="", seed=0, sharding_rules={},
        mesh=dict(data=-1, fsdp=1, tensor=1, sequence=1)))
    config.update(fields)
    return config


def load(config: ml_collections.ConfigDict, single_device: bool = False) -> LoadedModel:
    """The model `config` describes; its `tokenizer` / `chat_template` left empty are filled in place with the
    checkpoint's (`model_info.resolve`), and keys it lacks (mesh, sharding_rules, seed) get `checkpoint_config`'s."""
    for key, value in checkpoint_config("").items():
        if key not in config:
            config[key] = value
    model_info.resolve(config)
    info = model_info.read(config.init_from) if config.init_from else None
    if not config.model.to_dict() and info is None and not (
            config.init_from and runtime.is_hf_checkpoint(config.init_from)):
        raise ValueError(f"{config.init_from or 'no init_from'}: no model.json (written with this project's "
                         "checkpoints) and no HF config.json, so the architecture is unknown: set config.model")
    model_cfg = runtime.model_config(config)
    tokenizer = checked_tokenizer(config.tokenizer, model_cfg.vocab_size)
    mesh, rules = runtime.mesh_and_rules(config)
    runtime.log_run_header(config, model_cfg, mesh)
    model = Transformer(model_cfg)
    boxed = abstract_params(model, dummy_inputs())
    if single_device:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, nn.meta.unbox(boxed))
    else:
        shardings = sharding.param_shardings(boxed, mesh, rules)
    params = runtime.initial_params(config, model_cfg, nn.meta.unbox(boxed), shardings)
    if params is None:
        logging.info("no init_from: random weights from seed %d", config.seed)
        init = lambda key: nn.meta.unbox(model.init(key, *dummy_inputs())["params"])  # noqa: E731
        params = jax.jit(init, out_shardings=shardings)(jax.random.key(config.seed))
    max_length = info.max_length if info and info.max_length else model_cfg.max_position_embeddings
    return LoadedModel(model_cfg, model, params, tokenizer, config.chat_template, mesh, rules, max_length)


def build_engine(config: ml_collections.ConfigDict, **options) -> tuple[Engine, Tokenizer]:
    """A rollout engine over `load(config)`, stopping on EOS and the template's end of turn, with the tokenizer's
    text for stop strings; options go to `Engine` (slots, pages, ...)."""
    loaded = load(config)
    tokenizer = loaded.tokenizer
    engine = Engine(loaded.config, loaded.params, loaded.mesh, loaded.rules, pad_id=tokenizer.pad_id,
                    stop_ids=stop_token_ids(tokenizer, loaded.chat_template),
                    detokenize=lambda ids: tokenizer.decode(ids, skip_special=True), **options)
    return engine, tokenizer
