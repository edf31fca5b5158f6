"""Supervised fine-tuning on chat data with loss on assistant tokens."""
from __future__ import annotations

import logging
import functools
import json
import os

import jax
import ml_collections
import numpy as np

from alignment.algorithms.sft import sft_loss
from alignment.checkpoint import Checkpointer
from alignment.data import sft as sft_data
from alignment.data.sources import load_records
from alignment.data.tokenizer import load_tokenizer
from alignment.models import Transformer
from alignment.models.transformer import dummy_inputs
from alignment.train import runtime
from alignment.train.loop import train_loop
from alignment.train.metrics import peak_tflops_per_device
from alignment.train.optimizer import make_optimizer
from alignment.train.state import init_state, state_shardings
from alignment.train.step import jit_train_step, make_train_step

logger = logging.getLogger(__name__)


def prepare_data(config: ml_collections.ConfigDict, vocab_size: int):
    tokenizer = load_tokenizer(config.tokenizer)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"tokenizer {config.tokenizer!r} has {tokenizer.vocab_size} ids but the model's "
                         f"vocab_size is {vocab_size}")
    d = config.data
    encode = functools.partial(sft_data.encode_records, tokenizer=tokenizer, template=config.chat_template,
                               max_length=d.max_length, truncation=d.truncation, train_on=d.train_on)
    train, train_stats = encode(load_records(d.train, seed=config.seed, num_embedded=d.num_embedded),
                                source=d.train)
    held_out, _ = encode(load_records(d.eval, seed=config.seed + 1, num_embedded=d.num_embedded_eval),
                         source=d.eval)
    return train, train_stats, held_out


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    model_cfg = runtime.model_config(config)
    model = Transformer(model_cfg)
    mesh, rules = runtime.mesh_and_rules(config)
    runtime.log_run_header(config, model_cfg, mesh)

    train_rows, stats, eval_rows = prepare_data(config, model_cfg.vocab_size)
    logger.info("data: %s", stats.summary())
    optimizer, schedule = make_optimizer(config.optimizer, config.steps)
    init_inputs = dummy_inputs()
    abstract, shardings = state_shardings(model, optimizer, mesh, rules, init_inputs)

    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint.keep,
                                async_save=config.checkpoint.async_save)
    batches = iter(sft_data.batched(train_rows, config.batch_size, config.seed).to_iter_dataset())
    if checkpointer.latest_step() is not None:
        state, data_state = checkpointer.restore(abstract, shardings)
        batches.set_state(data_state)
        logger.info("resumed from step %d", int(state.step))
    else:
        params = runtime.initial_params(config, model_cfg, abstract.params, shardings.params)
        state = init_state(model, optimizer, shardings, config.seed, init_inputs, params)

    target = runtime.batch_sharding(mesh, rules)
    loss_fn = functools.partial(sft_loss, model)
    step = jit_train_step(make_train_step(loss_fn, optimizer, schedule, config.micro_batches), shardings,
                          target)
    placed = (runtime.place_batch(b, target) for b in batches)

    eval_batches = [runtime.place_batch(b, target)
                    for b in sft_data.batched(eval_rows, config.batch_size, 0, shuffle=False, repeat=False)]
    eval_loss = jax.jit(loss_fn)

    def evaluate(state) -> dict:
        total, count = 0.0, 0.0
        for b in eval_batches:
            loss_sum, (n, _) = eval_loss(state.params, b, jax.random.key(0))
            total, count = total + float(loss_sum), count + float(n)
        return {"loss": total / max(count, 1.0)}

    peak = peak_tflops_per_device(config.peak_tflops_per_device) * 1e12 * jax.device_count()
    state, final_eval = train_loop(
        state=state, train_step=step, batches=placed, num_steps=config.steps, workdir=workdir, config=config,
        flops_per_token=model_cfg.flops_per_token(config.data.max_length), peak_flops=peak,
        checkpointer=checkpointer, data_state=batches.get_state, eval_fn=evaluate)
    summary = {"data": stats.summary(), "final_eval": final_eval, "steps": int(state.step)}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    checkpointer.close()
    logger.info("summary: %s", summary)
    return summary
