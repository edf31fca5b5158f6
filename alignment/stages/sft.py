"""Supervised fine-tuning on a weighted mixture of chat sources, loss on assistant tokens."""
from __future__ import annotations

import functools
import logging

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from alignment.algorithms.sft import NORMALIZATIONS, sft_loss
from alignment.config import one_of
from alignment.data.chat import TRAIN_ON
from alignment.data import sft as sft_data
from alignment.data.tokenizer import checked_tokenizer
from alignment.models.transformer import dummy_inputs
from alignment.train import adapters, runtime
from alignment.train.loop import train_loop
from alignment.train.metrics import peak_tflops_per_device
from alignment.train.optimizer import make_optimizer
from alignment.train.state import state_shardings
from alignment.train.step import jit_train_step, make_train_step

logger = logging.getLogger(__name__)

FIELDS = {
    "loss_normalization": one_of(*NORMALIZATIONS),
    "data.truncation": one_of(*sft_data.TRUNCATION),
    "data.train_on": one_of(*TRAIN_ON),
}


def process_eval_batches(examples: list[dict], data: ml_collections.ConfigDict, batch_size: int) -> list[dict]:
    """This process's held-out batches, padded so every process runs as many eval steps as the busiest."""
    index, count = jax.process_index(), jax.process_count()
    batches = sft_data.eval_batches(examples, data, batch_size // count, index, count)
    if count > 1:
        most = int(np.max(multihost_utils.process_allgather(np.array(len(batches)))))
        batches = sft_data.eval_batches(examples, data, batch_size // count, index, count, num_batches=most)
    return batches


def make_evaluator(loss_fn, eval_sets: dict[str, list[dict]], target) -> callable:
    """Held-out token-mean loss per category (and overall), from global (sum, count) pairs."""
    placed = {name: [runtime.place_batch(b, target) for b in batches] for name, batches in eval_sets.items()}
    loss = jax.jit(loss_fn)

    def evaluate(state) -> dict:
        metrics, total, count = {}, 0.0, 0.0
        for name, batches in placed.items():
            s = n = 0.0
            for batch in batches:
                _, (_, m) = loss(state.model_params(), batch, jax.random.key(0))
                s, n = s + float(m["token_nll_sum"]), n + float(m["loss_tokens"])
            metrics[f"loss/{name}"] = s / max(n, 1.0)
            total, count = total + s, count + n
        metrics["loss"] = total / max(count, 1.0)
        return metrics

    return evaluate


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    model_cfg, model, mesh, rules = runtime.setup_model(config)
    tokenizer = checked_tokenizer(config.tokenizer, model_cfg.vocab_size)
    d = config.data
    load = functools.partial(sft_data.load_sources, data=d, tokenizer=tokenizer, template=config.chat_template)
    train_examples, reports = load(d.train, seed=config.seed, num_embedded=d.num_embedded)
    eval_examples, _ = load(d.eval, seed=config.seed + 1000, num_embedded=d.num_embedded_eval, split="eval")
    batches = iter(sft_data.train_batches(train_examples, d.train, d, config.batch_size, config.seed,
                                          jax.process_index(), jax.process_count()))
    eval_sets = {name: process_eval_batches(ex, d, config.batch_size) for name, ex in eval_examples.items()}

    optimizer, schedule = make_optimizer(config.optimizer, config.steps)
    if adapters.spec_of(config):
        checkpointer, state, data_state, shardings = adapters.resume_or_init(
            config, workdir, model, model_cfg, optimizer, mesh, rules, dummy_inputs())
    else:
        abstract, shardings = state_shardings(model, optimizer, mesh, rules, dummy_inputs())
        checkpointer, state, data_state = runtime.resume_or_init(config, workdir, model, model_cfg, optimizer,
                                                                 abstract, shardings, dummy_inputs())
    if data_state is not None:
        batches.set_state(data_state)

    target = runtime.batch_sharding(mesh, rules)
    loss_fn = functools.partial(sft_loss, model, normalization=config.loss_normalization)
    step = jit_train_step(make_train_step(loss_fn, optimizer, schedule, config.micro_batches), shardings, target)
    peak = peak_tflops_per_device(config.peak_tflops_per_device, model_cfg.dtype) * 1e12 * jax.device_count()
    with runtime.activation_context(mesh, rules):
        state, final_eval = train_loop(
            state=state, train_step=step, batches=(runtime.place_batch(b, target) for b in batches),
            num_steps=config.steps, workdir=workdir, config=config,
            flops_per_token=model_cfg.flops_per_token(d.max_length), peak_flops=peak,
            checkpointer=checkpointer, data_state=batches.get_state,
            eval_fn=make_evaluator(loss_fn, eval_sets, target))
    summary = {"data": sft_data.reports_summary(reports), "final_eval": final_eval, "steps": int(state.step)}
    checkpointer.close()
    logger.info("summary: %s", summary)
    return summary
