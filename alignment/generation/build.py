"""An engine and tokenizer from a stage-style config (model, init_from, tokenizer, chat_template, mesh, seed)."""
from __future__ import annotations

import flax.linen as nn
import jax
import ml_collections
from absl import logging

from alignment import sharding
from alignment.data.tokenizer import Tokenizer, checked_tokenizer
from alignment.generation.engine import Engine
from alignment.generation.text import stop_token_ids
from alignment.models import Transformer
from alignment.models.transformer import dummy_inputs
from alignment.train import runtime
from alignment.train.state import abstract_params


def build_engine(config: ml_collections.ConfigDict, stop: tuple[str, ...] = ()) -> tuple[Engine, Tokenizer]:
    """Weights from `config.init_from` (HF directory or Orbax checkpoint) or random init from `config.seed`,
    laid out on the config's mesh; the engine stops on EOS, the template's end of turn and single-token `stop`s."""
    model_cfg = runtime.model_config(config)
    tokenizer = checked_tokenizer(config.tokenizer, model_cfg.vocab_size)
    mesh, rules = runtime.mesh_and_rules(config)
    runtime.log_run_header(config, model_cfg, mesh)
    model = Transformer(model_cfg)
    boxed = abstract_params(model, dummy_inputs())
    shardings = sharding.param_shardings(boxed, mesh, rules)
    params = runtime.initial_params(config, model_cfg, nn.meta.unbox(boxed), shardings)
    if params is None:
        logging.info("no init_from: random weights from seed %d", config.seed)
        init = lambda key: nn.meta.unbox(model.init(key, *dummy_inputs())["params"])
        params = jax.jit(init, out_shardings=shardings)(jax.random.key(config.seed))
    engine = Engine(model_cfg, params, mesh, rules, pad_id=tokenizer.pad_id,
                    stop_ids=stop_token_ids(tokenizer, config.chat_template, stop))
    return engine, tokenizer
