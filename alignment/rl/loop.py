"""The RL driver shared by the stages: everything around a stage's own update of its state.

Per RL step: draw prompts by category weight -> sample completions with the current policy and reward
them -> the stage's `update(state, step, rollout) -> (state, record)` -> metrics. Around the steps: resume
from the newest checkpoint (the stage's state pytree, the prompt stream's position, the curve so far),
greedy held-out evaluation before RL and every `rl.eval_every` steps (which also re-weights the prompt
categories), checkpoints, a clean stop on SIGTERM, and the reward/accuracy curve at the end.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import ml_collections

from alignment.checkpoint import Checkpointer
from alignment.config import Field, at_least, in_range, one_of, positive
from alignment.data.prompts import PromptStream, load_prompts, reweight_by_accuracy
from alignment.generation.engine import Completions
from alignment.generation.sampling import SamplingParams
from alignment.rewards.registry import ON_ERROR, RewardResult
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


class Rollout(NamedTuple):
    """One RL step's samples: row p * num_samples + g is sample g of prompt p."""

    prompt_ids: list[list[int]]
    out: Completions
    rewards: RewardResult


def prompt_data(config: ml_collections.ConfigDict) -> tuple[PromptStream, dict[str, list[dict]]]:
    """The training prompt stream (categories drawn by their `weight`) and the held-out prompts per category."""
    prompts = load_prompts(config.data.train, seed=config.seed, num_embedded=config.data.num_embedded)
    held_out = load_prompts(config.data.eval, seed=config.seed + 1000, num_embedded=config.data.num_embedded_eval)
    stream = PromptStream(prompts, {c: s.get("weight", 1.0) for c, s in config.data.train.items()}, config.seed)
    return stream, held_out


def run(config: ml_collections.ConfigDict, workdir: str, *, state: Any, abstract: Any, shardings: Any,
        rollouts: Rollouts, stream: PromptStream, held_out: dict[str, list[dict]],
        policy_params: Callable[[Any], Any], update: Callable[[Any, int, Rollout], tuple[Any, dict]]) -> dict:
    """`config.steps` RL steps from `state` (or from the newest checkpoint in workdir); returns the summary.

    state / abstract / shardings: the stage's whole train state (any pytree), its abstract shapes and its
    shardings; policy_params(state) is what the rollout engine samples with. update(state, step, rollout)
    returns the new state and the step's metrics, which must hold reward and kl (and may hold timings).
    """
    rl = config.rl
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint.keep,
                                async_save=config.checkpoint.async_save)
    history, start = [], 0
    if checkpointer.latest_step() is not None:
        state, data_state = checkpointer.restore(abstract, shardings)
        stream.set_state(data_state["prompts"])
        history, start = data_state["history"], data_state["rl_step"]
        logger.info("resumed at RL step %d", start)
    sampling = SamplingParams(temperature=rl.temperature)
    writer, guard = MetricsWriter(workdir), PreemptionGuard()
    profiler = Profiler(config.profile, workdir)

    def evaluation(state, step):
        rollouts.engine.params = policy_params(state)
        return evaluate(rollouts, held_out, step)

    def save(state, step):
        data_state = {"prompts": stream.get_state(), "history": history, "rl_step": step}
        checkpointer.save(step, state, data_state, force=True)

    if start == 0:
        history.append({"step": 0, **evaluation(state, 0)})
        writer.write(0, history[-1], prefix="eval")
        logger.info("before RL: %s", history[-1])
    for step in range(start, config.steps):
        profiler.before_step(step)
        t0 = time.perf_counter()
        rollouts.engine.params = policy_params(state)
        records = stream.next(rl.prompts_per_step)
        rollout = Rollout(*rollouts.sample(records, rl.num_samples, sampling, seed=config.seed * 7919 + step))
        generation_s = time.perf_counter() - t0
        state, record = update(state, step, rollout)
        profiler.after_step(step, state)
        record["generation_s"] = generation_s
        writer.write(step + 1, record)
        history_entry = {"step": step + 1, "train_reward": record["reward"]}
        if rl.eval_every and (step + 1) % rl.eval_every == 0 or step + 1 == config.steps:
            result = evaluation(state, step + 1)
            writer.write(step + 1, result, prefix="eval")
            history_entry.update(result)
            if rl.reweight_categories and len(held_out) > 1:
                accuracy = {c: result[f"accuracy/{c}"] for c in held_out if c in stream.categories}
                stream.set_weights(reweight_by_accuracy(accuracy))
        history.append(history_entry)
        logger.info("rl step %d: reward %.3f kl %.4f gen %.1fs score %.1fs update %.1fs", step + 1,
                    record["reward"], record["kl"], generation_s, record.get("scoring_s", 0.0),
                    record.get("update_s", 0.0))
        if config.checkpoint.every and (step + 1) % config.checkpoint.every == 0 or step + 1 == config.steps:
            save(state, step + 1)
        if guard.should_stop(step + 1) and step + 1 < config.steps:
            save(state, step + 1)
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
    logger.info("held-out accuracy: %.3f before RL, %.3f after", summary["accuracy_before"], summary["accuracy_after"])
    return summary
