"""Prompts -> completions -> rewards, the held-out evaluation, and the minibatches of a rollout batch."""
from __future__ import annotations

from typing import Iterator

import numpy as np

from alignment.data.chat import encode_chat
from alignment.data.prompts import prompt_messages
from alignment.generation.engine import Engine
from alignment.generation.sampling import SamplingParams
from alignment.generation.text import finish, stop_token_ids
from alignment.rewards.registry import RewardFunction, Sample


class Rollouts:
    """Prompts -> completions -> rewards -> training rows, for one RL step or one evaluation."""

    def __init__(self, config, tokenizer, engine: Engine, rewards: RewardFunction):
        self.config, self.tokenizer, self.engine, self.rewards = config, tokenizer, engine, rewards
        self.stop = stop_token_ids(tokenizer, config.chat_template)

    tools = None  # tool definitions rendered into every prompt (multi-turn rollouts set them)

    def prompt_ids(self, records: list[dict]) -> list[list[int]]:
        ids = []
        for record in records:
            encoded = encode_chat(self.tokenizer, prompt_messages(record), self.config.chat_template,
                                  add_generation_prompt=True, tools=self.tools)
            if len(encoded.ids) > self.config.rl.max_prompt_length:
                raise ValueError(f"prompt {record.get('prompt_id')} has {len(encoded.ids)} tokens, more than "
                                 f"rl.max_prompt_length={self.config.rl.max_prompt_length}")
            ids.append(encoded.ids.tolist())
        return ids

    def sample(self, records: list[dict], num_samples: int, sampling: SamplingParams, seed: int, params=None):
        """(prompt ids, completions, rewards) of `num_samples` completions per record, sampled with `params`
        (the engine's own when None)."""
        prompts = self.prompt_ids(records)
        out = self.engine.generate(prompts, self.config.rl.max_new_tokens, sampling, num_samples=num_samples,
                                   seeds=seed, params=params)
        samples = []
        for row in range(len(out.lengths)):
            record = records[row // num_samples]
            text = finish(self.tokenizer, out.row(row), bool(out.stopped[row]))["text"]
            samples.append(Sample(prompt_id=str(record.get("prompt_id", row // num_samples)),
                                  prompt=prompt_messages(record), completion=text, record=record))
        return prompts, out, self.rewards(samples)


def evaluate(rollouts: Rollouts, held_out: dict[str, list[dict]], step: int, params=None) -> dict:
    """Greedy reward and accuracy (reward >= threshold) per category on held-out prompts, with `params`."""
    metrics = {}
    for category, records in sorted(held_out.items()):
        _, _, result = rollouts.sample(records, 1, SamplingParams(temperature=0.0), seed=step, params=params)
        metrics[f"reward/{category}"] = float(np.nanmean(result.total))
        metrics[f"accuracy/{category}"] = float(np.nanmean(result.total >= rollouts.config.rl.correct_threshold))
        # What multi-turn episodes did (rl.multiturn), e.g. episode_called: the share that made a well-formed call.
        metrics.update({f"{name}/{category}": float(np.nanmean(values)) for name, values in result.components.items()
                        if name.startswith("episode_")})
    metrics["accuracy"] = float(np.mean([v for k, v in metrics.items() if k.startswith("accuracy/")]))
    return metrics


def rollout_metrics(rewards, out, scored: dict, mask: np.ndarray) -> dict:
    """What every RL step reports about its rollouts: rewards, KL to the reference, entropy, lengths.

    scored: the scorer's [rows, tokens] kl and entropy (either may be absent when the update measures it
    instead); mask [rows, tokens] the completion tokens.
    """
    tokens = max(float(mask.sum()), 1.0)
    return {
        "reward": float(np.nanmean(rewards.total)),
        "reward_std": float(np.nanstd(rewards.total)),
        **{k: float((scored[k] * mask).sum() / tokens) for k in ("kl", "entropy") if k in scored},
        "completion_length": float(np.mean(out.lengths)),
        "reward_errors": len(rewards.errors),
        **{f"reward_{name}": float(np.nanmean(v)) for name, v in rewards.components.items()},
    }


def minibatches(rows: dict[str, np.ndarray], rl, seed: int, step: int) -> Iterator[dict[str, np.ndarray]]:
    """`rl.ppo_epochs` passes over the rows [rows, ...] in `rl.minibatches` shuffled minibatches (one order
    per RL step). `first_pass` [rows] is 1.0 in the first minibatch of the first pass, where the parameters
    are still the rollout's, so the loss may take its own log-probs as the old ones (ratio exactly 1).

    A single minibatch keeps the rollout's row order: shuffling it would change nothing but the order of
    sums, and in that order each prompt's samples stay together (`logprobs.target_hidden` with a group)."""
    rng = np.random.default_rng([seed, step])
    n = len(rows["loss_mask"])
    order = np.arange(n) if rl.minibatches == 1 else rng.permutation(n)
    for epoch in range(rl.ppo_epochs):
        for index, chunk in enumerate(np.array_split(order, rl.minibatches)):
            minibatch = {k: v[chunk] for k, v in rows.items()}
            minibatch["first_pass"] = np.full(len(chunk), float(epoch == 0 and index == 0), np.float32)
            yield minibatch
