"""The RL driver shared by the stages: everything around a stage's own update of its state.

Per RL step: the step's rollout (prompts drawn by category weight, completions sampled and rewarded by a
`producer.Producer`, through a `pipeline.Pipeline` that may make it ahead of time from parameters at most
`max_staleness` updates old) -> the stage's `update(state, step, rollout) -> (state, record)` -> metrics. Around
the steps: resume from the newest checkpoint (the stage's state pytree, the prompt stream's position, the
rollouts in flight, the curve so far), greedy held-out evaluation before RL and every `rl.eval_every` steps
(which also re-weights the prompt categories), checkpoints, a clean stop on SIGTERM, and the reward/accuracy
curve at the end, with the sampler/trainer mismatch and the staleness beneath.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from alignment.checkpoint import Checkpointer
from alignment.config import Field, at_least, in_range, one_of, positive
from alignment.data.prompts import PromptStream, load_prompts, reweight_by_accuracy
from alignment.rewards.registry import ON_ERROR
from alignment.rl.pipeline import Pipeline
from alignment.rl.producer import Producer, Rollout, rollout_from_state, rollout_state
from alignment.rl.rollouts import Rollouts, evaluate
from alignment.train.loop import Preempted, Profiler
from alignment.train.metrics import MetricsWriter
from alignment.train.preemption import PreemptionGuard

logger = logging.getLogger(__name__)

# The keys every RL stage's config shares (its `rl` block, rewards and prompt data).
FIELDS = {
    "rl.prompts_per_step": positive(),
    "rl.num_samples": positive(),
    "rl.max_prompt_length": positive(),
    "rl.max_new_tokens": positive(),
    "rl.temperature": Field(low=0, open_low=True),
    "rl.clip_low": in_range(0, 1),
    "rl.clip_high": Field(low=0),
    "rl.ppo_epochs": positive(),
    "rl.minibatches": positive(),
    "rl.beta": Field(low=0),
    "rl.kl_top_k": positive(),
    "rl.eval_every": at_least(0),
    "reward_on_error": one_of(*ON_ERROR),
}


# What the curve keeps of a step's record besides the reward (when the stage reports it).
CURVE_KEYS = ("staleness", "mismatch_kl", "is_masked_fraction", "is_truncated_fraction")


def prompt_data(config: ml_collections.ConfigDict) -> tuple[PromptStream, dict[str, list[dict]]]:
    """The training prompt stream (categories drawn by their `weight`) and the held-out prompts per category."""
    prompts = load_prompts(config.data.train, seed=config.seed, num_embedded=config.data.num_embedded)
    held_out = load_prompts(config.data.eval, seed=config.seed + 1000, num_embedded=config.data.num_embedded_eval)
    stream = PromptStream(prompts, {c: s.get("weight", 1.0) for c, s in config.data.train.items()}, config.seed)
    return stream, held_out


def run(config: ml_collections.ConfigDict, workdir: str, *, state: Any, abstract: Any, shardings: Any,
        rollouts: Rollouts, stream: PromptStream, held_out: dict[str, list[dict]],
        policy_params: Callable[[Any], Any], update: Callable[[Any, int, Rollout], tuple[Any, dict]],
        producer: Callable[[int, Any, int], Rollout] | None = None, max_staleness: int = 0,
        to_sampler: Callable[[Any], Any] | None = None) -> dict:
    """`config.steps` RL steps from `state` (or from the newest checkpoint in workdir); returns the summary.

    state / abstract / shardings: the stage's whole train state (any pytree), its abstract shapes and its
    shardings; policy_params(state) is the policy. update(state, step, rollout) returns the new state and the
    step's metrics, which must hold reward and kl (and may hold timings). `rollouts` evaluates the policy.
    producer(step, params, version) makes each step's rollout, drawing from `stream` (default: a plain
    `Producer` over `rollouts`); max_staleness: k of `Pipeline`; to_sampler(params): the parameters the producer
    samples with (default: the policy's own at k = 0, else a copy, since the update donates the state's buffers).
    """
    rl = config.rl
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint.keep,
                                async_save=config.checkpoint.async_save)
    history, start, in_flight, prompt_weights = [], 0, [], None
    if checkpointer.latest_step() is not None:
        state, data_state = checkpointer.restore(abstract, shardings)
        stream.set_state(data_state["prompts"])
        history, start = data_state["history"], data_state["rl_step"]
        in_flight = [rollout_from_state(r) for r in data_state.get("in_flight", [])]
        prompt_weights = data_state.get("prompt_weights")
        logger.info("resumed at RL step %d with %d rollouts in flight", start, len(in_flight))
    producer = producer or Producer(rollouts, stream, rl, config.seed)
    if to_sampler is None:
        to_sampler = (lambda params: jax.tree.map(jnp.copy, params)) if max_staleness else (lambda params: params)
    writer, guard = MetricsWriter(workdir), PreemptionGuard()
    profiler = Profiler(config.profile, workdir)

    def evaluation(state, step):
        return evaluate(rollouts, held_out, step, params=policy_params(state))

    def save(state, step, in_flight, prompt_weights):
        # The rollouts in flight (made from older parameters than the state's) are kept, not regenerated.
        data_state = {"prompts": stream.get_state(), "history": history, "rl_step": step,
                      "in_flight": [rollout_state(r) for r in in_flight], "prompt_weights": prompt_weights}
        checkpointer.save(step, state, data_state, force=True)

    if start == 0:
        history.append({"step": 0, **evaluation(state, 0)})
        writer.write(0, history[-1], prefix="eval")
        logger.info("before RL: %s", history[-1])
    pipeline = Pipeline(producer, max_staleness, start, config.steps, reweight=stream.set_weights, pending=in_flight)
    pipeline.publish(start, to_sampler(policy_params(state)), prompt_weights)
    try:
        for step in range(start, config.steps):
            profiler.before_step(step)
            t0 = time.perf_counter()
            rollout = pipeline.next(step)
            t1 = time.perf_counter()
            state, record = update(state, step, rollout)
            pipeline.trainer_busy(t1, time.perf_counter())
            profiler.after_step(step, state)
            record.update(rollout.stats, staleness=step - rollout.version, rollout_wait_s=t1 - t0)
            writer.write(step + 1, record)
            history_entry = {"step": step + 1, "train_reward": record["reward"],
                             **{k: record[k] for k in CURVE_KEYS if k in record}}
            prompt_weights = None
            if rl.eval_every and (step + 1) % rl.eval_every == 0 or step + 1 == config.steps:
                result = evaluation(state, step + 1)
                writer.write(step + 1, result, prefix="eval")
                history_entry.update(result)
                if rl.reweight_categories and len(held_out) > 1:
                    accuracy = {c: result[f"accuracy/{c}"] for c in held_out if c in stream.categories}
                    prompt_weights = reweight_by_accuracy(accuracy)
            history.append(history_entry)
            logger.info("rl step %d: reward %.3f kl %.4f gen %.1fs score %.1fs update %.1fs (staleness %d)", step + 1,
                        record["reward"], record["kl"], record.get("generation_s", 0.0), record.get("scoring_s", 0.0),
                        record.get("update_s", 0.0), record["staleness"])
            last = step + 1 == config.steps
            if config.checkpoint.every and (step + 1) % config.checkpoint.every == 0 or last:
                save(state, step + 1, pipeline.pending(), prompt_weights)
            if guard.should_stop(step + 1) and not last:
                save(state, step + 1, pipeline.pending(), prompt_weights)
                checkpointer.wait()
                raise Preempted(step + 1)
            if not last:
                pipeline.publish(step + 1, to_sampler(policy_params(state)), prompt_weights)
    finally:
        pipeline.close()
    checkpointer.wait()
    guard.close()
    writer.close()
    summary = write_curve(workdir, history)
    if summary:
        summary.update(staleness=staleness_counts(history), pipeline=pipeline.report())
    checkpointer.close()
    return summary


def staleness_counts(history: list[dict]) -> dict[str, int]:
    """How many RL steps trained on rollouts of each staleness (updates between sampler and trainer)."""
    counts: dict[str, int] = {}
    for entry in history:
        if "staleness" in entry:
            counts[str(entry["staleness"])] = counts.get(str(entry["staleness"]), 0) + 1
    return dict(sorted(counts.items(), key=lambda item: int(item[0])))


def write_curve(workdir: str, history: list[dict]) -> dict:
    """Reward/accuracy curve as JSONL and PNG in the workdir, the PNG with a second panel of the sampler/trainer
    mismatch and the staleness when the steps report them; the summary of before and after."""
    if jax.process_index() != 0:
        return {}
    with open(os.path.join(workdir, "curve.jsonl"), "w") as f:
        for entry in history:
            f.write(json.dumps(entry) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [h for h in history if "train_reward" in h]
    mismatch = [h for h in trained if "mismatch_kl" in h]
    figure, axes = plt.subplots(2 if mismatch else 1, 1, figsize=(6, 5.5 if mismatch else 3.5), sharex=True,
                                squeeze=False)
    axis = axes[0, 0]
    axis.plot([h["step"] for h in trained], [h["train_reward"] for h in trained], label="train reward")
    evals = [h for h in history if "accuracy" in h]
    axis.plot([h["step"] for h in evals], [h["accuracy"] for h in evals], "o-", label="held-out accuracy")
    axis.legend()
    axis.grid(alpha=0.3)
    if mismatch:
        lower = axes[1, 0]
        lower.plot([h["step"] for h in mismatch], [h["mismatch_kl"] for h in mismatch], color="C2",
                   label="KL(sampler || trainer) per token")
        lower.set_ylabel("mismatch KL")
        lower.grid(alpha=0.3)
        staleness = lower.twinx()
        staleness.step([h["step"] for h in trained], [h.get("staleness", 0) for h in trained], where="mid",
                       color="C3", label="staleness (updates)")
        staleness.set_ylabel("staleness")
        staleness.set_ylim(bottom=0)
        lower.legend(*[a + b for a, b in zip(lower.get_legend_handles_labels(),
                                             staleness.get_legend_handles_labels())], fontsize=8)
    axes[-1, 0].set_xlabel("RL step")
    figure.tight_layout()
    figure.savefig(os.path.join(workdir, "curve.png"), dpi=120)
    plt.close(figure)
    summary = {"accuracy_before": evals[0]["accuracy"], "accuracy_after": evals[-1]["accuracy"],
               "steps": history[-1]["step"]}
    logger.info("held-out accuracy: %.3f before RL, %.3f after", summary["accuracy_before"], summary["accuracy_after"])
    return summary
