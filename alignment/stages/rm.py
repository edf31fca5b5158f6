"""Reward model: Bradley-Terry plus absolute-score regression, value head on the policy trunk."""
from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np
from absl import logging

from alignment.algorithms import rm
from alignment.config import Field, at_least, one_of, positive
from alignment.data import preference
from alignment.models.transformer import dummy_inputs
from alignment.train import adapters, runtime
from alignment.train.loop import train_loop
from alignment.train.metrics import peak_tflops_per_device
from alignment.train.optimizer import make_optimizer
from alignment.train.state import state_shardings
from alignment.train.step import jit_train_step, make_train_step


FIELDS = {
    "rm.alpha": Field(low=0),
    "data.truncation": one_of(*preference.TRUNCATION),
    "data.trim_multiple": at_least(0),
    "data.pairs_per_row": positive(),
}


def check(config: ml_collections.ConfigDict) -> None:
    if not config.model.get("value_head", False):
        raise ValueError("the rm stage needs config.model.value_head=True")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    model_cfg, model, mesh, rules = runtime.setup_model(config)

    train_rows, eval_rows, data_summary = preference.prepare_data(config, model_cfg.vocab_size)
    logging.info("data: %s", data_summary)
    optimizer, schedule = make_optimizer(config.optimizer, config.steps, rm.unused_params(model_cfg))
    init_inputs = dummy_inputs()
    batches = iter(preference.shuffled_batches(train_rows, config.batch_size, config.seed).to_iter_dataset())
    if adapters.spec_of(config):  # adapters on the trunk, the value head trained whole
        checkpointer, state, data_state, shardings = adapters.resume_or_init(
            config, workdir, model, model_cfg, optimizer, mesh, rules, init_inputs, full=runtime.VALUE_HEAD)
    else:
        abstract, shardings = state_shardings(model, optimizer, mesh, rules, init_inputs)
        checkpointer, state, data_state = runtime.resume_or_init(config, workdir, model, model_cfg, optimizer,
                                                                 abstract, shardings, init_inputs)
    if data_state is not None:
        batches.set_state(data_state)

    target = runtime.batch_sharding(mesh, rules)
    preference.check_rows_split(config, target)
    layout = preference.leaf_shardings(train_rows[0], target)
    loss_fn = functools.partial(rm.reward_loss, model, alpha=config.rm.alpha, use_margin=config.rm.use_margin)
    train_step = make_train_step(loss_fn, optimizer, schedule, config.micro_batches)

    def step_with_means(state, batch):
        state, sums = train_step(state, batch)
        return state, rm.finalize_metrics(sums)

    step = jit_train_step(step_with_means, shardings, layout)
    compact = functools.partial(preference.compact, pairs_per_row=config.data.pairs_per_row)
    placed = (preference.place(compact(b, trim_multiple=config.data.trim_multiple), layout) for b in batches)

    eval_batches = [preference.place(compact(b, trim_multiple=0), layout)
                    for b in preference.fixed_batches(eval_rows, config.batch_size)]
    score = jax.jit(functools.partial(rm.pair_rewards, model))

    def evaluate(state) -> dict:
        rewards = np.concatenate([np.asarray(score(state.model_params(), b)) for b in eval_batches])[:len(eval_rows)]
        fields = {k: np.asarray([r[k] for r in eval_rows]) for k in
                  ("chosen_score", "rejected_score", "has_score", "margin")}
        loss_sum, sums = rm.score_pairs(rewards, fields, config.rm.alpha, config.rm.use_margin)
        sums["count"] = np.float32(len(eval_rows))
        out = rm.finalize_metrics(sums)
        return {k: float(v) for k, v in dict(out, loss=loss_sum / len(eval_rows)).items()}

    peak = peak_tflops_per_device(config.peak_tflops_per_device, model_cfg.dtype) * 1e12 * jax.device_count()
    state, final_eval = train_loop(
        state=state, train_step=step, batches=placed, num_steps=config.steps, workdir=workdir, config=config,
        flops_per_token=model_cfg.flops_per_token(2 * config.data.max_length), peak_flops=peak,
        checkpointer=checkpointer, data_state=batches.get_state, eval_fn=evaluate)
    summary = {"data": data_summary, "final_eval": final_eval, "steps": int(state.step)}
    checkpointer.close()
    logging.info("summary: %s", summary)
    return summary
