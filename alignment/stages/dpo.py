"""Offline preference optimisation: DPO, IPO, hinge, robust DPO and KTO against a frozen reference.

The reference is the initial policy. `config.reference='precomputed'` scores every row with it once before
training and stores `ref_logps` in the rows, so no reference weights stay in memory; 'online' keeps a copy
and scores each batch just before its step. Both feed the same loss.
"""
from __future__ import annotations

import functools
import os

import jax
import ml_collections
import numpy as np
from absl import logging

from alignment.algorithms import dpo
from alignment.checkpoint import Checkpointer
from alignment.config import Field, at_least, one_of, positive
from alignment.data import preference
from alignment.models.transformer import dummy_inputs
from alignment.train import adapters, runtime
from alignment.train.loop import train_loop
from alignment.train.metrics import peak_tflops_per_device
from alignment.train.optimizer import make_optimizer
from alignment.train.state import init_state, state_shardings
from alignment.train.step import jit_train_step, make_train_step

REFERENCE = ("precomputed", "online")
FIELDS = {
    "loss": one_of(*dpo.LOSSES),
    "reference": one_of(*REFERENCE),
    "beta": Field(low=0, open_low=True),
    "kto.desirable_weight": Field(low=0),
    "kto.undesirable_weight": Field(low=0),
    "data.truncation": one_of(*preference.TRUNCATION),
    "data.trim_multiple": at_least(0),
    "data.pairs_per_row": positive(),
}


def check(config: ml_collections.ConfigDict) -> None:
    if not 0 <= config.label_smoothing < 0.5 or (config.label_smoothing and config.loss not in ("sigmoid", "robust")):
        raise ValueError(f"config.label_smoothing={config.label_smoothing} must be in [0, 0.5) and only with the "
                         "sigmoid or robust loss")


def loss_and_terms(model, config: ml_collections.ConfigDict):
    """(loss_fn(params, batch, rng), terms(logps, lengths, rows) -> (loss sum, metric sums)) for config.loss."""
    if config.loss == "kto":
        kw = dict(beta=config.beta, **config.kto.to_dict())
        terms = lambda lp, ln, b: dpo.kto_terms(lp, ln, b["ref_logps"], b["desirable"], **kw)  # noqa: E731
        return functools.partial(dpo.kto_loss, model, **kw), terms
    kw = dict(loss_type=config.loss, beta=config.beta, label_smoothing=config.label_smoothing)
    terms = lambda lp, ln, b: dpo.dpo_terms(lp, ln, b["ref_logps"], **kw)  # noqa: E731
    return functools.partial(dpo.dpo_loss, model, **kw), terms


def score_rows(logps_fn, params, rows: list[dict], batch_size: int, layout: dict, pairs_per_row: int,
               trim_multiple: int):
    """(log-probs [n, 2], completion lengths [n, 2]) of every row under `params`, in row order."""
    outs = [logps_fn(params, preference.place(preference.compact(b, pairs_per_row, trim_multiple), layout))
            for b in preference.fixed_batches(rows, batch_size)]
    logps = np.concatenate([np.asarray(lp) for lp, _ in outs])[:len(rows)]
    lengths = np.concatenate([np.asarray(ln) for _, ln in outs])[:len(rows)]
    return logps, lengths


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    model_cfg, model, mesh, rules = runtime.setup_model(config)

    train_rows, eval_rows, data_summary = preference.prepare_data(config, model_cfg.vocab_size,
                                                                  unpaired=config.loss == "kto")
    logging.info("data: %s", data_summary)
    optimizer, schedule = make_optimizer(config.optimizer, config.steps)
    init_inputs = dummy_inputs()
    checkpointer = data_state = None
    if adapters.spec_of(config):  # resumed here: the reference is the base (adapters off) however far training got
        checkpointer, state, data_state, shardings = adapters.resume_or_init(
            config, workdir, model, model_cfg, optimizer, mesh, rules, init_inputs)
    else:
        abstract, shardings = state_shardings(model, optimizer, mesh, rules, init_inputs)
        params = runtime.initial_params(config, model_cfg, abstract.params, shardings.params)
        state = init_state(model, optimizer, shardings, config.seed, init_inputs, params)

    target = runtime.batch_sharding(mesh, rules)
    preference.check_rows_split(config, target)
    layout = preference.leaf_shardings(dict(train_rows[0], ref_logps=None), target)
    logps_fn = jax.jit(functools.partial(dpo.sequence_logps, model))
    score = functools.partial(score_rows, logps_fn, batch_size=config.batch_size, layout=layout,
                              pairs_per_row=config.data.pairs_per_row, trim_multiple=config.data.trim_multiple)
    reference = None
    # With LoRA the initial policy is the frozen base itself: no copy of the weights.
    initial = state.frozen if state.lora is not None else state.params
    if config.reference == "precomputed":  # the initial policy scores every row once; nothing stays in memory
        for rows in (train_rows, eval_rows):
            for row, ref in zip(rows, score(initial, rows)[0]):
                row["ref_logps"] = ref
    else:
        reference = initial if state.lora is not None else jax.tree.map(lambda x: x.copy(), initial)
        eval_ref = score(reference, eval_rows)[0]

    batches = iter(preference.shuffled_batches(train_rows, config.batch_size, config.seed).to_iter_dataset())
    if data_state is not None:
        batches.set_state(data_state)
    elif checkpointer is None:
        checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint.keep,
                                    async_save=config.checkpoint.async_save)
    if state.lora is None and checkpointer.latest_step() is not None:
        state, data_state = checkpointer.restore(abstract, shardings)
        batches.set_state(data_state)
        logging.info("resumed from step %d", int(state.step))

    loss_fn, terms = loss_and_terms(model, config)
    train_step = make_train_step(loss_fn, optimizer, schedule, config.micro_batches)

    def step_with_means(state, batch):
        state, sums = train_step(state, batch)
        return state, dpo.finalize_metrics(sums)

    step = jit_train_step(step_with_means, shardings, layout)

    def placed():
        for b in batches:
            b = preference.place(preference.compact(b, config.data.pairs_per_row, config.data.trim_multiple), layout)
            if reference is not None:
                b["ref_logps"] = jax.device_put(logps_fn(reference, b)[0], layout["ref_logps"])
            yield b

    def evaluate(state) -> dict:
        logps, lengths = score(state.model_params(), eval_rows)
        fields = {k: np.stack([r[k] for r in eval_rows]) for k in ("ref_logps", "desirable") if k in eval_rows[0]}
        if reference is not None:
            fields["ref_logps"] = eval_ref
        loss_sum, sums = terms(logps, lengths, fields)
        sums["count"] = np.float32(len(eval_rows))
        out = dpo.finalize_metrics(sums)
        return {k: float(v) for k, v in dict(out, loss=loss_sum / len(eval_rows)).items()}

    peak = peak_tflops_per_device(config.peak_tflops_per_device, model_cfg.dtype) * 1e12 * jax.device_count()
    state, final_eval = train_loop(
        state=state, train_step=step, batches=placed(), num_steps=config.steps, workdir=workdir, config=config,
        flops_per_token=model_cfg.flops_per_token(2 * config.data.max_length), peak_flops=peak,
        checkpointer=checkpointer, data_state=batches.get_state, eval_fn=evaluate)
    summary = {"data": data_summary, "final_eval": final_eval, "steps": int(state.step)}
    checkpointer.close()
    logging.info("summary: %s", summary)
    return summary
