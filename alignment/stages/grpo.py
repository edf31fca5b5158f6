"""GRPO with a KL anchor to a frozen reference policy, as the Baichuan report runs it.

One RL step: draw prompts by category weight -> G samples each from the rollout engine (same mesh,
same parameters as the trainer) -> rewards -> group advantages -> score the rollouts (old log-probs,
KL to the reference) -> `ppo_epochs` passes of clipped policy updates -> optionally one PTX-KL step
on SFT data. Every `eval_every` steps: greedy accuracy per category on held-out prompts, which also
re-weights the categories of the prompt stream.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alignment.algorithms import grpo
from alignment.algorithms.logprobs import logprobs_entropy_kl, token_logprobs
from alignment.checkpoint import Checkpointer
from alignment.data import sft as sft_data
from alignment.data.chat import encode_chat
from alignment.data.prompts import PromptStream, load_prompts, prompt_messages, reweight_by_accuracy
from alignment.data.rollouts import rollout_rows
from alignment.generation.engine import Engine
from alignment.generation.sampling import SamplingParams
from alignment.generation.text import finish, stop_token_ids
from alignment.models import Transformer
from alignment.models.transformer import dummy_inputs
from alignment.rewards.registry import RewardFunction, Sample, from_config
from alignment.train import runtime
from alignment.train.metrics import MetricsWriter
from alignment.train.optimizer import make_optimizer
from alignment.train.preemption import PreemptionGuard
from alignment.train.loop import Preempted
from alignment.train.state import init_state, state_shardings
from alignment.train.step import jit_train_step, make_train_step

logger = logging.getLogger(__name__)


class Rollouts:
    """Prompts -> completions -> rewards -> training rows, for one RL step or one evaluation."""

    def __init__(self, config, tokenizer, engine: Engine, rewards: RewardFunction):
        self.config, self.tokenizer, self.engine, self.rewards = config, tokenizer, engine, rewards
        self.stop = stop_token_ids(tokenizer, config.chat_template)

    def prompt_ids(self, records: list[dict]) -> list[list[int]]:
        ids = []
        for record in records:
            encoded = encode_chat(self.tokenizer, prompt_messages(record), self.config.chat_template,
                                  add_generation_prompt=True)
            if len(encoded.ids) > self.config.rl.max_prompt_length:
                raise ValueError(f"prompt {record.get('prompt_id')} has {len(encoded.ids)} tokens, more than "
                                 f"rl.max_prompt_length={self.config.rl.max_prompt_length}")
            ids.append(encoded.ids.tolist())
        return ids

    def sample(self, records: list[dict], num_samples: int, sampling: SamplingParams, seed: int):
        prompts = self.prompt_ids(records)
        out = self.engine.generate(prompts, self.config.rl.max_new_tokens, sampling, num_samples=num_samples,
                                   seeds=seed)
        samples = []
        for row in range(len(out.lengths)):
            record = records[row // num_samples]
            text = finish(self.tokenizer, out.row(row), bool(out.stopped[row]))["text"]
            samples.append(Sample(prompt_id=str(record.get("prompt_id", row // num_samples)),
                                  prompt=prompt_messages(record), completion=text, record=record))
        return prompts, out, self.rewards(samples)


def make_scorer(model: Transformer, config) -> callable:
    """Jitted: old log-probs of the rollout tokens and what the KL mode needs from the reference."""
    rl, impl = config.rl, model.config.logprob_impl or None

    @jax.jit
    def score(params, ref_params, batch):
        apply = lambda p: model.apply({"params": p}, batch["inputs"], batch["positions"], batch["segment_ids"])
        unembed = lambda p: model.apply({"params": p}, method="unembedding")
        hidden, ref_hidden = apply(params), apply(ref_params)
        out = {}
        if rl.kl_mode == "token_reward":
            ids, ref_lp = grpo.reference_topk(ref_hidden, unembed(ref_params), rl.kl_top_k, rl.temperature)
            scored = logprobs_entropy_kl(hidden, unembed(params), batch["targets"], temperature=rl.temperature,
                                         ref_topk_ids=ids, ref_topk_logprobs=ref_lp, with_entropy=True, impl=impl)
            out["kl"] = scored.kl
        else:
            scored = logprobs_entropy_kl(hidden, unembed(params), batch["targets"], temperature=rl.temperature,
                                         with_entropy=True, impl=impl)
            out["ref_logp"] = token_logprobs(ref_hidden, unembed(ref_params), batch["targets"], rl.temperature,
                                             impl=impl)
            out["kl"] = grpo.k3(scored.logp, out["ref_logp"])
        out["old_logp"], out["entropy"] = scored.logp, scored.entropy
        return out

    return score


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


def evaluate(rollouts: Rollouts, held_out: dict[str, list[dict]], step: int) -> dict:
    """Greedy reward and accuracy (reward >= threshold) per category on held-out prompts."""
    metrics = {}
    for category, records in sorted(held_out.items()):
        _, _, result = rollouts.sample(records, 1, SamplingParams(temperature=0.0), seed=step)
        metrics[f"reward/{category}"] = float(np.nanmean(result.total))
        metrics[f"accuracy/{category}"] = float(np.nanmean(result.total >= rollouts.config.rl.correct_threshold))
    metrics["accuracy"] = float(np.mean([v for k, v in metrics.items() if k.startswith("accuracy/")]))
    return metrics


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    rl = config.rl
    model_cfg, model, mesh, rules = runtime.setup_model(config)
    tokenizer = runtime.checked_tokenizer(config, model_cfg)

    prompts = load_prompts(config.data.train, seed=config.seed, num_embedded=config.data.num_embedded)
    held_out = load_prompts(config.data.eval, seed=config.seed + 1000, num_embedded=config.data.num_embedded_eval)
    stream = PromptStream(prompts, {c: s.get("weight", 1.0) for c, s in config.data.train.items()}, config.seed)

    updates_per_step = rl.ppo_epochs * rl.minibatches + (1 if rl.ptx_gamma else 0)
    optimizer, schedule = make_optimizer(config.optimizer, config.steps * updates_per_step)
    abstract, shardings = state_shardings(model, optimizer, mesh, rules, dummy_inputs())
    init_params = runtime.initial_params(config, model_cfg, abstract.params, shardings.params)
    state = init_state(model, optimizer, shardings, config.seed, dummy_inputs(), init_params)
    ref_params = jax.tree.map(jnp.copy, state.params)  # frozen: the policy's starting point
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint.keep,
                                async_save=config.checkpoint.async_save)
    history, start = [], 0
    if checkpointer.latest_step() is not None:
        state, data_state = checkpointer.restore(abstract, shardings)
        stream.set_state(data_state["prompts"])
        history, start = data_state["history"], data_state["rl_step"]
        logger.info("resumed at RL step %d", start)

    engine = Engine(model_cfg, state.params, mesh, rules, pad_id=tokenizer.pad_id,
                    stop_ids=stop_token_ids(tokenizer, config.chat_template))
    rollouts = Rollouts(config, tokenizer, engine, from_config(config))
    target = runtime.batch_sharding(mesh, rules)
    score = make_scorer(model, config)
    loss = functools.partial(grpo.grpo_loss, model, temperature=rl.temperature, clip_low=rl.clip_low,
                             clip_high=rl.clip_high, kl_mode=rl.kl_mode, beta=rl.beta,
                             aggregation=rl.aggregation, max_tokens=rl.max_new_tokens)
    # Batches keep the layout `place_batch` gives them (rows over the data axes, whatever their rank).
    update = jit_train_step(make_train_step(loss, optimizer, schedule, config.micro_batches), shardings, None)
    ptx = make_ptx_batches(config, tokenizer, model, ref_params)
    if ptx is not None:
        ptx_step = jit_train_step(make_train_step(functools.partial(grpo.ptx_kl_loss, model, gamma=rl.ptx_gamma),
                                                  optimizer, schedule), shardings, None)
    sampling = SamplingParams(temperature=rl.temperature)
    writer, guard = MetricsWriter(workdir), PreemptionGuard()

    def data_state(step):
        return {"prompts": stream.get_state(), "history": history, "rl_step": step}

    with runtime.activation_context(mesh, rules):
        if start == 0:
            history.append({"step": 0, **evaluate(rollouts, held_out, 0)})
            writer.write(0, history[-1], prefix="eval")
            logger.info("before RL: %s", history[-1])
        for step in range(start, config.steps):
            timings, t0 = {}, time.perf_counter()
            engine.params = state.params
            records = stream.next(rl.prompts_per_step)
            prompt_ids, out, rewards = rollouts.sample(records, rl.num_samples, sampling, seed=config.seed * 7919 + step)
            timings["generation_s"] = time.perf_counter() - t0

            t1 = time.perf_counter()
            valid = rewards.valid.reshape(-1, rl.num_samples).all(axis=1)
            group_rewards = np.nan_to_num(rewards.total.reshape(-1, rl.num_samples))
            seq_adv = np.asarray(grpo.group_advantages(jnp.asarray(group_rewards), rl.scale_rewards,
                                                       rl.advantage_estimator))
            seq_adv = (seq_adv * valid[:, None]).reshape(-1)  # groups with a skipped sample are left out
            rows = rollout_rows(prompt_ids, out.tokens, out.lengths, rl.num_samples, rl.max_prompt_length,
                                rl.max_new_tokens)
            batch = runtime.place_batch(rows, target)
            scored = jax.device_get(score(state.params, ref_params, batch))
            mask = rows["loss_mask"]
            if rl.kl_mode == "token_reward":
                advantages = np.asarray(grpo.token_advantages(jnp.asarray(seq_adv), scored["kl"], mask, rl.beta))
            else:
                advantages = seq_adv[:, None] * mask
            rows.update(advantages=advantages.astype(np.float32), old_logp=scored["old_logp"],
                        ref_logp=scored.get("ref_logp", np.zeros_like(scored["old_logp"])))
            timings["scoring_s"] = time.perf_counter() - t1

            t2 = time.perf_counter()
            metrics = []
            order = np.random.default_rng([config.seed, step]).permutation(len(seq_adv))
            for epoch in range(rl.ppo_epochs):
                for index, chunk in enumerate(np.array_split(order, rl.minibatches)):
                    minibatch = {k: v[chunk] for k, v in rows.items()}
                    minibatch["first_pass"] = np.full(len(chunk), float(epoch == 0 and index == 0), np.float32)
                    state, m = update(state, runtime.place_batch(minibatch, target))
                    metrics.append(m)
            if ptx is not None:
                stream_ptx, attach = ptx
                state, m = ptx_step(state, attach(runtime.place_batch(next(stream_ptx), target)))
                metrics.append({"ptx_kl": m["ptx_kl_sum"] / jnp.maximum(m["tokens"], 1.0)})
            metrics = jax.device_get(metrics)
            timings["update_s"] = time.perf_counter() - t2

            tokens = float(mask.sum())
            record = {
                "reward": float(np.nanmean(rewards.total)),
                "reward_std": float(np.nanstd(rewards.total)),
                "kl": float((scored["kl"] * mask).sum() / max(tokens, 1.0)),
                "entropy": float((scored["entropy"] * mask).sum() / max(tokens, 1.0)),
                "completion_length": float(np.mean(out.lengths)),
                "loss": float(np.mean([m["loss"] for m in metrics if "loss" in m])),
                "clip_fraction": float(sum(m.get("clip_fraction_sum", 0) for m in metrics)
                                       / max(sum(m.get("tokens", 0) for m in metrics if "clip_fraction_sum" in m), 1)),
                "first_ratio": float(metrics[0]["ratio_sum"] / max(metrics[0]["tokens"], 1.0)),
                "reward_errors": len(rewards.errors),
                "skipped_groups": int((~valid).sum()),
                **{f"reward_{name}": float(np.nanmean(v)) for name, v in rewards.components.items()},
                **timings,
            }
            if ptx is not None:
                record["ptx_kl"] = float(metrics[-1]["ptx_kl"])
            writer.write(step + 1, record)
            history_entry = {"step": step + 1, "train_reward": record["reward"]}
            if rl.eval_every and (step + 1) % rl.eval_every == 0 or step + 1 == config.steps:
                engine.params = state.params
                evaluation = evaluate(rollouts, held_out, step + 1)
                writer.write(step + 1, evaluation, prefix="eval")
                history_entry.update(evaluation)
                if rl.reweight_categories and len(held_out) > 1:
                    accuracy = {c: evaluation[f"accuracy/{c}"] for c in held_out if c in stream.categories}
                    stream.set_weights(reweight_by_accuracy(accuracy))
            history.append(history_entry)
            logger.info("rl step %d: reward %.3f kl %.4f gen %.1fs score %.1fs update %.1fs", step + 1,
                        record["reward"], record["kl"], timings["generation_s"], timings["scoring_s"],
                        timings["update_s"])
            if config.checkpoint.every and (step + 1) % config.checkpoint.every == 0 or step + 1 == config.steps:
                checkpointer.save(step + 1, state, data_state(step + 1), force=True)
            if guard.should_stop(step + 1) and step + 1 < config.steps:
                checkpointer.save(step + 1, state, data_state(step + 1), force=True)
                checkpointer.wait()
                raise Preempted(step + 1)
    checkpointer.wait()
    guard.close()
    writer.close()
    summary = write_curve(workdir, history)
    checkpointer.close()
    return summary


def write_curve(workdir: str, history: list[dict]) -> dict:
    """Reward/accuracy curve as JSONL and PNG in the workdir; the summary of before and after."""
    if jax.process_index() != 0:
        return {}
    with open(os.path.join(workdir, "curve.jsonl"), "w") as f:
        for entry in history:
            f.write(json.dumps(entry) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] for h in history if "train_reward" in h]
    axis.plot(steps, [h["train_reward"] for h in history if "train_reward" in h], label="train reward")
    evals = [h for h in history if "accuracy" in h]
    axis.plot([h["step"] for h in evals], [h["accuracy"] for h in evals], "o-", label="held-out accuracy")
    axis.set_xlabel("RL step")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(os.path.join(workdir, "curve.png"), dpi=120)
    plt.close(figure)
    summary = {"accuracy_before": evals[0]["accuracy"], "accuracy_after": evals[-1]["accuracy"],
               "steps": history[-1]["step"]}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    logger.info("held-out accuracy: %.3f before RL, %.3f after", summary["accuracy_before"], summary["accuracy_after"])
    return summary
