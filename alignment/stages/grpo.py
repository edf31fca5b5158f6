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

Off-policy options: `rl.max_staleness = k` samples step s's rollout from the parameters after s - k updates,
made ahead by a producer thread (`rl.pipeline`) while the trainer updates, on the training mesh or on a
rollout mesh of its own (`rl.rollout_devices`; parameters copied there after each update), optionally in
another precision (`rl.rollout_dtype`). The update's pi_old is the trainer's policy at the step's start, and
`rl.is_correction` (truncated or masked importance sampling, per token or per sequence) weighs each token by
pi_old / sampler. Every step records the sampler/trainer mismatch (`mismatch_kl`, the k3 estimate of
KL(sampler || trainer) per token; `mismatch_abs_log_ratio_mean` / `_max`), the fraction of tokens the correction
masked or truncated (`is_masked_fraction` / `is_truncated_fraction`) and the rollout's `staleness`.
Sampling options: dynamic sampling (`rl.dynamic_sampling`) and overlong handling (`rl.overlong`), see
`rl.producer`; policy losses by name (`rl.policy_loss`: ppo_clip, gspo, cispo).
"""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from alignment import sharding
from alignment.algorithms import grpo, off_policy
from alignment.config import Field, at_least, one_of, positive
from alignment.data import sft as sft_data
from alignment.data.rl_rows import completion_rows
from alignment.data.tokenizer import checked_tokenizer
from alignment.generation.engine import Engine
from alignment.generation.text import stop_token_ids
from alignment.models.transformer import dummy_inputs
from alignment.rewards.registry import from_config
from alignment.rl import loop, multiturn, producer
from alignment.rl.rollouts import Rollouts, minibatches, rollout_metrics
from alignment.rl.scoring import make_scorer
from alignment.train import adapters, runtime
from alignment.train.optimizer import make_optimizer
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
    **multiturn.FIELDS,
    "rl.kl_mode": one_of(*grpo.KL_MODES),
    "rl.scale_rewards": one_of(*grpo.ADVANTAGE_SCALES),
    "rl.advantage_estimator": one_of(*grpo.ESTIMATORS),
    "rl.aggregation": one_of(*grpo.AGGREGATIONS),
    "rl.ptx_gamma": Field(low=0),
    "rl.ptx_batch_size": positive(),
    "rl.policy_loss": one_of(*grpo.POLICY_LOSSES),
    "rl.max_staleness": at_least(0),
    "rl.rollout_devices": at_least(0),
    "rl.rollout_dtype": one_of("", "float32", "bfloat16"),
    "rl.is_correction": one_of(*off_policy.IS_MODES),
    "rl.is_level": one_of(*off_policy.IS_LEVELS),
    "rl.is_low": Field(low=0),
    "rl.is_high": Field(low=0, open_low=True),
    "rl.dynamic_sampling_max_draws": positive(),
    "rl.overlong": one_of(*producer.OVERLONG),
    "rl.overlong_buffer": positive(),
    "rl.overlong_penalty": Field(low=0),
}


def check(config: ml_collections.ConfigDict) -> None:
    rl = config.rl
    if rl.kl_importance_ratio and rl.kl_mode != "k3":
        raise ValueError(f"rl.kl_importance_ratio weights the k3 KL term: it needs rl.kl_mode 'k3', got {rl.kl_mode!r}")
    if rl.is_low >= rl.is_high:
        raise ValueError(f"rl.is_low={rl.is_low} must be below rl.is_high={rl.is_high}")
    if rl.overlong == "penalty" and rl.overlong_buffer > rl.max_new_tokens:
        raise ValueError(f"rl.overlong_buffer={rl.overlong_buffer} exceeds rl.max_new_tokens={rl.max_new_tokens}")
    if rl.max_staleness and jax.process_count() > 1:
        # Two threads launching device programs could order them differently on different hosts (a hang).
        raise ValueError("rl.max_staleness runs the producer in a thread of each process, which multi-host runs "
                         "do not support yet: leave it 0 with several processes")
    if config.get("lora") and config.lora.enabled and (rl.rollout_devices or rl.rollout_dtype):
        raise ValueError("config.lora.enabled: rl.rollout_devices and rl.rollout_dtype copy or cast full parameters; "
                         "with LoRA leave them 0 and ''")
    if rl.rollout_devices:
        if jax.process_count() > 1:
            raise ValueError("rl.rollout_devices splits one host's devices; with several processes leave it 0")
        if rl.rollout_devices >= jax.device_count():
            raise ValueError(f"rl.rollout_devices={rl.rollout_devices} leaves no training device: "
                             f"{jax.device_count()} devices in all")


def make_sampler(config, model_cfg, mesh, rules, rollouts: Rollouts, param_shardings):
    """(the producer's Rollouts, to_sampler) for `loop.run`: the engine rollouts are sampled with and how the
    policy's parameters reach it. The trainer's own engine when nothing differs (the synchronous loop as it
    was); an engine of its own when the producer runs ahead (`rl.max_staleness`: the trainer evaluates with its
    engine meanwhile) or computes in `rl.rollout_dtype`; with `rl.rollout_devices = n`, on a data-parallel mesh
    of the first n devices (the trainer has the rest), parameters copied there after every update."""
    rl = config.rl
    sampler_cfg = dataclasses.replace(model_cfg, dtype=rl.rollout_dtype or model_cfg.dtype)
    if not rl.rollout_devices and not rl.max_staleness and sampler_cfg == model_cfg:
        return rollouts, None
    to_sampler, sampler_mesh = None, mesh
    if rl.rollout_devices:
        sampler_mesh = sharding.make_mesh({"data": rl.rollout_devices}, jax.devices()[: rl.rollout_devices])
        target = jax.tree.map(lambda s: NamedSharding(sampler_mesh, s.spec), param_shardings)
        to_sampler = lambda params: jax.device_put(params, target)  # noqa: E731
    engine = rollouts.engine
    engine = Engine(sampler_cfg, None, sampler_mesh, rules, pad_id=engine.pad_id, stop_ids=engine.stop_ids)
    return type(rollouts)(config, rollouts.tokenizer, engine, rollouts.rewards), to_sampler


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    rl = config.rl
    kl_form = grpo.kl_form(rl.kl_importance_ratio)
    # The first rl.rollout_devices devices sample (make_sampler), the rest train.
    model_cfg, model, mesh, rules = runtime.setup_model(config, jax.devices()[rl.rollout_devices:])
    tokenizer = checked_tokenizer(config.tokenizer, model_cfg.vocab_size)
    stream, held_out = loop.prompt_data(config)

    updates_per_step = rl.ppo_epochs * rl.minibatches + (1 if rl.ptx_gamma else 0)
    optimizer, schedule = make_optimizer(config.optimizer, config.steps * updates_per_step)
    # With LoRA the reference is the frozen base (adapters off): no copy of the weights.
    abstract, shardings, state, ref_params = adapters.init_policy(config, model, model_cfg, optimizer, mesh, rules,
                                                                  workdir, dummy_inputs())

    engine = Engine(model_cfg, adapters.sampling_params(state), mesh, rules, pad_id=tokenizer.pad_id,
                    stop_ids=stop_token_ids(tokenizer, config.chat_template))
    rollouts = multiturn.make_rollouts(config, tokenizer, engine, from_config(config))  # tool episodes with env.name
    sampler_rollouts, to_sampler = make_sampler(config, model_cfg, mesh, rules, rollouts, shardings.params)
    make_rollout = producer.Producer(sampler_rollouts, stream, rl, config.seed,
                                     max_draws=rl.dynamic_sampling_max_draws if rl.dynamic_sampling else 1,
                                     overlong=producer.Overlong(rl.overlong, rl.overlong_buffer, rl.overlong_penalty))
    target = runtime.batch_sharding(mesh, rules)
    # One pass (k3 in the loss): the update recomputes the policy's log-probs with the step's starting parameters,
    # pi_old (first_pass), so scoring only runs the reference; the update reports the KL and entropy.
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
                             kl_importance_ratio=rl.kl_importance_ratio, policy=rl.policy_loss,
                             correction=off_policy.ISCorrection(rl.is_correction, rl.is_level, rl.is_low,
                                                                rl.is_high))
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
        # Only the policy's own tokens are trained (a multi-turn episode's tool results are context).
        rows["loss_mask"] &= rollout.in_loss[:, None] & multiturn.model_mask(rollout.out, rows["loss_mask"].shape[1])
        # The sampler's log-probs of its tokens (of the truncated distribution it drew from, if any).
        rows["sampler_logp"] = np.zeros(rows["loss_mask"].shape, np.float32)
        width = min(rows["loss_mask"].shape[1], rollout.out.sampling_logprobs.shape[1])
        rows["sampler_logp"][:, :width] = rollout.out.sampling_logprobs[:, :width]
        scored = jax.device_get(score(state.model_params(), ref_params, runtime.place_batch(rows, target)))
        mask = rows["loss_mask"]
        if single_pass:  # never read (first_pass), but kept meaningful: the sampler's own log-probs
            scored["old_logp"] = rows["sampler_logp"]
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
        first = metrics[: rl.minibatches]  # the first pass: every row once, against pi_old
        first_tokens = max(sum(m["tokens"] for m in first), 1.0)
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
            "mismatch_kl": float(sum(m["mismatch_kl_sum"] for m in first) / first_tokens),
            "mismatch_abs_log_ratio_mean": float(sum(m["mismatch_abs_log_ratio_sum"] for m in first) / first_tokens),
            "mismatch_abs_log_ratio_max": float(max(m["mismatch_abs_log_ratio_max"] for m in first)),
            **({"is_masked_fraction": float(sum(m["is_masked_sum"] for m in first) / first_tokens),
                "is_truncated_fraction": float(sum(m["is_truncated_sum"] for m in first) / first_tokens)}
               if rl.is_correction != "none" else {}),
            "skipped_groups": int((~valid).sum()),
            "scoring_s": scoring_s,
            "update_s": time.perf_counter() - t2,
        }
        if ptx is not None:
            record["ptx_kl"] = float(metrics[-1]["ptx_kl"])
        return state, record

    with runtime.activation_context(mesh, rules):
        return loop.run(config, workdir, state=state, abstract=abstract, shardings=shardings, rollouts=rollouts,
                        stream=stream, held_out=held_out, policy_params=adapters.sampling_params, update=rl_step,
                        producer=make_rollout, max_staleness=rl.max_staleness, to_sampler=to_sampler)
