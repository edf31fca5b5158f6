"""The producer side of an RL step: its rollout, made from given parameters.

`Producer(step, params, version)` draws `rl.prompts_per_step` prompts from the stream, samples
`rl.num_samples` completions of each with the engine at `params`, and rewards them. Options:
  * overlong handling (`Overlong`): DAPO's soft penalty on completions that run into the token limit, added to
    the reward, or leaving truncated completions out of the loss;
  * dynamic sampling (DAPO): a group whose rewards are all equal carries no signal (its advantages are 0), so it is
    dropped and more prompts are drawn until `prompts_per_step` groups with signal are in, at most `max_draws`
    draws; if still short, dropped groups fill the batch but stay out of the loss (`Rollout.in_loss`).
A rollout depends only on the stream's state, the step and the parameters, so the producer may run ahead of the
trainer in a thread (`rl.pipeline`) and still give the same rollouts as the synchronous loop.
"""
from __future__ import annotations

import base64
import dataclasses
import time
from typing import Any, NamedTuple

import numpy as np

from alignment.data.prompts import PromptStream
from alignment.generation.engine import Completions
from alignment.generation.sampling import SamplingParams
from alignment.rewards.registry import RewardResult
from alignment.rl.multiturn import TurnCompletions
from alignment.rl.rollouts import Rollouts

OVERLONG = ("none", "mask", "penalty")
DRAW_SEED_STRIDE = 104_729  # the engine seeds of extra draws within one step lie this far apart


@dataclasses.dataclass(frozen=True)
class Rollout:
    """One RL step's samples: row p * num_samples + g is sample g of prompt p.

    version: the parameters that sampled it (the number of RL updates they had seen); in_loss [rows] bool: False
    for rows the loss leaves out (overlong masking, groups that only fill a dynamic-sampling batch); stats: the
    producer's metrics for this rollout (seconds spent, dynamic-sampling and overlong counts).
    """

    prompt_ids: list[list[int]]
    out: Completions
    rewards: RewardResult
    version: int = 0
    in_loss: np.ndarray | None = None
    stats: dict = dataclasses.field(default_factory=dict)


class Overlong(NamedTuple):
    """What happens to completions that reach the token limit `max_new`: `mode` none | mask (out of the loss) |
    penalty (DAPO's: 0 up to max_new - buffer tokens, then a penalty falling linearly to -penalty at max_new)."""

    mode: str = "none"
    buffer: int = 1
    penalty: float = 1.0


def overlong_penalty(lengths: np.ndarray, max_new: int, buffer: int, penalty: float) -> np.ndarray:
    """DAPO's soft overlong punishment [rows] for completions of `lengths` tokens (at most max_new)."""
    return -penalty * np.clip((lengths - (max_new - buffer)) / buffer, 0.0, 1.0)


def has_signal(rewards: RewardResult, num_samples: int) -> np.ndarray:
    """[groups] bool: every sample was scored and the rewards are not all equal (otherwise advantages are 0)."""
    total = np.nan_to_num(rewards.total.reshape(-1, num_samples))  # NaN only where a sample was skipped
    return rewards.valid.reshape(-1, num_samples).all(axis=1) & (np.ptp(total, axis=1) > 0)


def take_rows(parts: list[tuple[Any, np.ndarray]]) -> Any:
    """The rows `rows` [n] of each (Completions or RewardResult, rows), concatenated in order into one."""
    first = parts[0][0]

    def rows_of(values, rows):
        return values[rows] if isinstance(values, np.ndarray) else values

    fields = {}
    for field in dataclasses.fields(first):
        values = [getattr(part, field.name) for part, _ in parts]
        if isinstance(values[0], np.ndarray):
            fields[field.name] = np.concatenate([v[rows] for v, (_, rows) in zip(values, parts)])
        elif isinstance(values[0], dict):  # reward components: name -> [rows]
            fields[field.name] = {k: np.concatenate([rows_of(v[k], r) for v, (_, r) in zip(values, parts)])
                                  for k in values[0]}
        elif isinstance(values[0], list):  # reward errors: all of them happened
            fields[field.name] = [e for v in values for e in v]
        elif isinstance(values[0], bool):  # Completions.truncated
            fields[field.name] = any(values)
        else:
            fields[field.name] = values[0]
    return type(first)(**fields)


class Producer:
    """Makes the rollout of an RL step from given parameters; owns the prompt stream it draws from."""

    def __init__(self, rollouts: Rollouts, stream: PromptStream, rl, seed: int, *, max_draws: int = 1,
                 overlong: Overlong = Overlong()):
        if overlong.mode not in OVERLONG:
            raise ValueError(f"overlong mode must be one of {OVERLONG}, got {overlong.mode!r}")
        self.rollouts, self.stream, self.seed = rollouts, stream, seed
        self.prompts, self.samples, self.max_new = rl.prompts_per_step, rl.num_samples, rl.max_new_tokens
        self.sampling = SamplingParams(temperature=rl.temperature)
        self.max_draws, self.overlong = max_draws, overlong

    def __call__(self, step: int, params: Any, version: int) -> Rollout:
        start = time.perf_counter()
        kept, spare, uniform, draws = [], [], 0, 0
        while len(kept) < self.prompts and draws < self.max_draws:
            records = self.stream.next(self.prompts)
            seed = self.seed * 7919 + step + DRAW_SEED_STRIDE * draws
            prompt_ids, out, rewards = self.rollouts.sample(records, self.samples, self.sampling, seed, params)
            rewards = self.shaped(rewards, out)
            signal = has_signal(rewards, self.samples) if self.max_draws > 1 else np.ones(self.prompts, bool)
            uniform += int((~signal).sum())
            for group in range(self.prompts):
                (kept if signal[group] else spare).append((prompt_ids[group], out, rewards, group))
            draws += 1
        unfilled = max(0, self.prompts - len(kept))
        groups = kept[: self.prompts] + spare[:unfilled]
        rows = lambda group: group * self.samples + np.arange(self.samples)
        if self.max_draws > 1:  # the chosen groups, in order, from whichever draw they came (else: the one draw)
            out = take_rows([(o, rows(g)) for _, o, _, g in groups])
            rewards = take_rows([(r, rows(g)) for _, _, r, g in groups])
        in_loss = np.repeat(np.arange(self.prompts) < self.prompts - unfilled, self.samples)
        truncated = ~out.stopped & (out.lengths >= self.max_new)
        if self.overlong.mode == "mask":
            in_loss &= ~truncated
        stats = {"generation_s": time.perf_counter() - start, "truncated_fraction": float(truncated.mean())}
        if self.overlong.mode == "mask":
            stats["overlong_masked"] = int(truncated.sum())
        if self.max_draws > 1:
            stats.update(dynamic_sampling_draws=draws, dynamic_sampling_uniform_groups=uniform,
                         dynamic_sampling_unfilled_groups=unfilled)
        return Rollout([g[0] for g in groups], out, rewards, version, in_loss, stats)

    def shaped(self, rewards: RewardResult, out: Completions) -> RewardResult:
        """The rewards with the overlong penalty added (as the `overlong` component) when that mode is on."""
        if self.overlong.mode != "penalty":
            return rewards
        penalty = overlong_penalty(out.lengths, self.max_new, self.overlong.buffer, self.overlong.penalty)
        return dataclasses.replace(rewards, total=rewards.total + penalty,
                                   components={**rewards.components, "overlong": penalty})


def _encode(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return {"array": base64.b64encode(np.ascontiguousarray(value).tobytes()).decode("ascii"),
                "dtype": value.dtype.str, "shape": list(value.shape)}
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"array", "dtype", "shape"}:
        data = np.frombuffer(base64.b64decode(value["array"]), np.dtype(value["dtype"]))
        return data.reshape(value["shape"]).copy()
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def rollout_state(rollout: Rollout) -> dict:
    """A rollout as JSON data for a checkpoint, exact: arrays as base64 bytes with their dtype and shape."""
    fields = {f.name: getattr(rollout, f.name) for f in dataclasses.fields(rollout)}
    fields["out"] = {f.name: getattr(rollout.out, f.name) for f in dataclasses.fields(rollout.out)}
    fields["rewards"] = {f.name: getattr(rollout.rewards, f.name) for f in dataclasses.fields(rollout.rewards)}
    return _encode(fields)


def rollout_from_state(state: dict) -> Rollout:
    """The rollout `rollout_state` wrote."""
    fields = _decode(state)
    fields["out"] = (TurnCompletions if "model_mask" in fields["out"] else Completions)(**fields["out"])
    fields["rewards"] = RewardResult(**fields["rewards"])
    return Rollout(**fields)
