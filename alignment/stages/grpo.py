"""GRPO with a KL anchor to a frozen reference policy, as the Baichuan report runs it.

One RL step (driven by `alignment.rl.loop`, which also evaluates, checkpoints and resumes): draw prompts
by category weight -> G samples each from the rollout engine (same mesh, same parameters as the trainer)
-> rewards -> group advantages -> score the rollouts (old log-probs, KL to the reference) -> `ppo_epochs`
passes of clipped policy updates -> optionally one PTX-KL step on SFT data. Rows are `completion_rows` (the
output head runs on completion tokens only), and each prompt runs once for its samples where rows keep their
groups; with one on-policy pass and k3, scoring runs the reference only. Every `eval_every` steps:
greedy accuracy per category on held-out prompts, which also re-weights the categories of the prompt stream.

Each step records `kl`, the rollout policy's KL to the reference, and in k3 mode also the KL term of the
loss per token over the step's updates, named by its form: `kl_k3`, or `kl_k3_ratio` with
`rl.kl_importance_ratio` (k3 weighted by exp(logp - old_logp), TRL's `use_bias_correction_kl`).
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alignment.algorithms import grpo
from alignment.config import Field, one_of, positive
from alignment.data import sft as sft_data
from alignment.data.rl_rows import completion_rows
from alignment.data.tokenizer import checked_tokenizer
from alignment.generation.engine import Engine
from alignment.generation.text import stop_token_ids
from alignment.models.transformer import dummy_inputs
from alignment.rewards.registry import from_config
from alignment.rl import loop
from alignment.rl.rollouts import Rollouts, minibatches, rollout_metrics
from alignment.rl.scoring import make_scorer
from alignment.train import runtime
from alignment.train.optimizer import make_optimizer
from alignment.train.state import init_state, state_shardings
from alignment.train.step import jit_train_step, make_train_step


def make_ptx_batches(config, tokenizer, model, ref_params):
    """SFT batches with the reference's top-K attached, for the PTX-KL penalty; None when gamma is 0."""
    if not config.rl.ptx_gamma:
        return None
    d = config.ptx_data
    examples, _ = sft_data.load_sources(d.train, d, tokenizer, config.chat_template, config.seed, d.num_embedded)
    stream = iter(sft_data.train_batches(examples, d.train, d, config.rl.ptx_batch_size, config.seed))

    @jax.jit
    def attach(batch):
        hidden = model.apply({"params": ref_params}, batch["inputs"], batch["positions"], batch["segment_ids"])
        unembedding = model.apply({"params": ref_params}, method="unembedding")
        ids, logprobs = grpo.reference_topk(hidden, unembedding, config.rl.kl_top_k)
        return dict(batch, ref_topk_ids=ids, ref_topk_logprobs=logprobs)

    return stream, attach


FIELDS = {
    **loop.FIELDS,
    "rl.kl_mode": one_of(*grpo.KL_MODES),
    "rl.scale_rewards": one_of(*grpo.ADVANTAGE_SCALES),
    "rl.advantage_estimator": one_of(*grpo.ESTIMATORS),
    "rl.aggregation": one_of(*grpo.AGGREGATIONS),
    "rl.ptx_gamma": Field(low=0),
    "rl.ptx_batch_size": positive(),
}


def check(config: ml_collections.ConfigDict) -> None:
    rl = config.rl
    if rl.kl_importance_ratio and rl.kl_mode != "k3":
        raise ValueError(f"rl.kl_importance_ratio weights the k3 KL term: it needs rl.kl_mode 'k3', got {rl.kl_mode!r}")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    rl = config.rl
    kl_form = grpo.kl_form(rl.kl_importance_ratio)
    model_cfg, model, mesh, rules = runtime.setup_model(config)
    tokenizer = checked_tokenizer(config.tokenizer, model_cfg.vocab_size)
    stream, held_out = loop.prompt_data(config)

    updates_per_step = rl.ppo_epochs * rl.minibatches + (1 if rl.ptx_gamma else 0)
    optimizer, schedule = make_optimizer(config.optimizer, config.steps * updates_per_step)
    abstract, shardings = state_shardings(model, optimizer, mesh, rules, dummy_inputs())
    init_params = runtime.initial_params(config, model_cfg, abstract.params, shardings.params)
    state = init_state(model, optimizer, shardings, config.seed, dummy_inputs(), init_params)
    ref_params = jax.tree.map(jnp.copy, state.params)  # frozen: the policy's starting point

    engine = Engine(model_cfg, state.params, mesh, rules, pad_id=tokenizer.pad_id,
                    stop_ids=stop_token_ids(tokenizer, config.chat_template))
    rollouts = Rollouts(config, tokenizer, engine, from_config(config))
    target = runtime.batch_sharding(mesh, rules)
    # One on-policy pass (k3 in the loss): the update recomputes the policy's log-probs with the rollout's own
    # parameters (first_pass), so scoring only runs the reference; the update reports the KL and entropy.
    single_pass = rl.kl_mode == "k3" and rl.ppo_epochs == 1 and rl.minibatches == 1
    # Each prompt runs once for its samples (a KV cache they share) where rows keep their groups: always in
    # scoring; in the update with one minibatch and no micro-batches (which regroup rows). The cached path
    # has no remat and no Ulysses attention, so configs using those keep the plain forward.
    share = mesh.shape.get("sequence", 1) == 1
    score = make_scorer(model, rl.temperature, "top_k" if rl.kl_mode == "token_reward" else "k3", rl.kl_top_k,
                        policy=not single_pass, group=rl.num_samples if share else 1)
    share &= model_cfg.remat_policy == "none" and rl.minibatches == 1 and config.micro_batches == 1
    update_group = rl.num_samples if share else 1
    loss = functools.partial(grpo.grpo_loss, model, temperature=rl.temperature, clip_low=rl.clip_low,
                             clip_high=rl.clip_high, kl_mode=rl.kl_mode, beta=rl.beta,
                             aggregation=rl.aggregation, max_tokens=rl.max_new_tokens, group=update_group,
                             kl_importance_ratio=rl.kl_importance_ratio)
    # Batches keep the layout `place_batch` gives them (rows over the data axes, whatever their rank).
    update = jit_train_step(make_train_step(loss, optimizer, schedule, config.micro_batches), shardings, None)
    ptx = make_ptx_batches(config, tokenizer, model, ref_params)
    if ptx is not None:
        ptx_step = jit_train_step(make_train_step(functools.partial(grpo.ptx_kl_loss, model, gamma=rl.ptx_gamma),
                                                  optimizer, schedule), shardings, None)

    def rl_step(state, step, rollout):
        t1 = time.perf_counter()
        rewards = rollout.rewards
        valid = rewards.valid.reshape(-1, rl.num_samples).all(axis=1)
        group_rewards = np.nan_to_num(rewards.total.reshape(-1, rl.num_samples))
        seq_adv = np.asarray(grpo.group_advantages(jnp.asarray(group_rewards), rl.scale_rewards,
                                                   rl.advantage_estimator))
        seq_adv = (seq_adv * valid[:, None]).reshape(-1)  # groups with a skipped sample are left out
        rows = completion_rows(rollout.prompt_ids, rollout.out.tokens, rollout.out.lengths, rl.num_samples,
                               rl.max_prompt_length, rl.max_new_tokens)
        scored = jax.device_get(score(state.params, ref_params, runtime.place_batch(rows, target)))
        mask = rows["loss_mask"]
        if single_pass:  # never read (first_pass), but kept meaningful: the sampler's own log-probs
            scored["old_logp"] = np.zeros(mask.shape, np.float32)
            width = min(mask.shape[1], rollout.out.logprobs.shape[1])
            scored["old_logp"][:, :width] = rollout.out.logprobs[:, :width]
        if rl.kl_mode == "token_reward":
            advantages = np.asarray(grpo.token_advantages(jnp.asarray(seq_adv), scored["kl"], mask, rl.beta))
        else:
            advantages = seq_adv[:, None] * mask
        rows.update(advantages=advantages.astype(np.float32), old_logp=scored["old_logp"],
                    ref_logp=scored.get("ref_logp", np.zeros_like(scored["old_logp"])))
        scoring_s = time.perf_counter() - t1

        t2 = time.perf_counter()
        metrics = []
        for minibatch in minibatches(rows, rl, config.seed, step):
            state, m = update(state, runtime.place_batch(minibatch, target))
            metrics.append(m)
        if ptx is not None:
            stream_ptx, attach = ptx
            state, m = ptx_step(state, attach(runtime.place_batch(next(stream_ptx), target)))
            metrics.append({"ptx_kl": m["ptx_kl_sum"] / jnp.maximum(m["tokens"], 1.0)})
        metrics = jax.device_get(metrics)
        kl_term = [m for m in metrics if f"{kl_form}_sum" in m]  # the policy updates, in k3 mode
        record = {
            **rollout_metrics(rewards, rollout.out, scored, mask),
            **({f"kl_{kl_form}": float(sum(m[f"{kl_form}_sum"] for m in kl_term)
                                       / max(sum(m["tokens"] for m in kl_term), 1.0))} if kl_term else {}),
            **({"kl": float(metrics[0][f"{kl_form}_sum"] / max(metrics[0]["tokens"], 1.0)),
                "entropy": float(metrics[0]["entropy_sum"] / max(metrics[0]["tokens"], 1.0))} if single_pass else {}),
            "loss": float(np.mean([m["loss"] for m in metrics if "loss" in m])),
            "clip_fraction": float(sum(m.get("clip_fraction_sum", 0) for m in metrics)
                                   / max(sum(m.get("tokens", 0) for m in metrics if "clip_fraction_sum" in m), 1)),
            "first_ratio": float(metrics[0]["ratio_sum"] / max(metrics[0]["tokens"], 1.0)),
            "skipped_groups": int((~valid).sum()),
            "scoring_s": scoring_s,
            "update_s": time.perf_counter() - t2,
        }
        if ptx is not None:
            record["ptx_kl"] = float(metrics[-1]["ptx_kl"])
        return state, record

    with runtime.activation_context(mesh, rules):
        return loop.run(config, workdir, state=state, abstract=abstract, shardings=shardings, rollouts=rollouts,
                        stream=stream, held_out=held_out, policy_params=lambda s: s.params, update=rl_step)
