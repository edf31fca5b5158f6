"""Rollouts -> training rows: prompt + completion per row, loss on the completion tokens only.

Two layouts of the same next-token data:
  * `rollout_rows`: right-padded, every per-token array [rows, width] over the whole row (PPO's critic
    needs values at every position);
  * `completion_rows`: prompts left-padded so that every completion starts at the same column, with the
    per-token arrays [rows, C] over the completion window only, so the output head (a third of the model's
    FLOPs at a 32k vocabulary) never runs on prompt or padding positions.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def rollout_rows(prompts: Sequence[Sequence[int]], completions: np.ndarray, lengths: np.ndarray, num_samples: int,
                 max_prompt: int, max_new: int) -> dict[str, np.ndarray]:
    """Rows [prompts * num_samples, max_prompt + max_new - 1] of next-token data.

    Row p * num_samples + g holds prompt p followed by its completion g (`completions` [rows, >= length]).
    `loss_mask[t]` is True where `targets[t]` is a completion token.
    """
    rows, width = len(prompts) * num_samples, max_prompt + max_new - 1
    out = {
        "inputs": np.zeros((rows, width), np.int32),
        "targets": np.zeros((rows, width), np.int32),
        "loss_mask": np.zeros((rows, width), np.bool_),
        "positions": np.zeros((rows, width), np.int32),
        "segment_ids": np.zeros((rows, width), np.int32),
    }
    for row in range(rows):
        prompt = list(prompts[row // num_samples])
        if len(prompt) > max_prompt:
            raise ValueError(f"prompt {row // num_samples} has {len(prompt)} tokens, more than max_prompt={max_prompt}")
        n = int(lengths[row])
        ids = np.asarray(prompt + list(completions[row, :n]), np.int32)
        m = len(ids) - 1
        out["inputs"][row, :m] = ids[:-1]
        out["targets"][row, :m] = ids[1:]
        out["loss_mask"][row, len(prompt) - 1:m] = True
        out["positions"][row, :m] = np.arange(m)
        out["segment_ids"][row, :m] = 1
    return out


def round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def completion_rows(prompts: Sequence[Sequence[int]], completions: np.ndarray, lengths: np.ndarray,
                    num_samples: int, max_prompt: int, max_new: int, multiple: int = 64) -> dict[str, np.ndarray]:
    """Rows of next-token data in the completion-window layout; R = prompts * num_samples rows.

    P = the longest prompt and C = the longest completion, each rounded up to `multiple` but at most
    max_prompt / max_new (few distinct shapes, so few compilations). Row p * num_samples + g holds prompt p left-padded to end at column P - 1,
    then completion g (`completions` [R, >= length]):
      inputs, positions, segment_ids [R, P + C - 1]  (segment 0 = padding, positions from 0 at the prompt);
      targets, loss_mask [R, C]: targets[:, j] is completion token j, predicted at input column P - 1 + j,
      i.e. by the last C input columns; loss_mask marks the real completion tokens.
    """
    rows = len(prompts) * num_samples
    for i, prompt in enumerate(prompts):
        if len(prompt) > max_prompt:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens, more than max_prompt={max_prompt}")
    if np.max(lengths) > max_new:
        raise ValueError(f"a completion has {np.max(lengths)} tokens, more than max_new={max_new}")
    prompt_len = min(round_up(max(len(p) for p in prompts), multiple), max_prompt)
    new = min(round_up(int(np.max(lengths)), multiple), max_new)
    width = prompt_len + new - 1
    out = {
        "inputs": np.zeros((rows, width), np.int32),
        "positions": np.zeros((rows, width), np.int32),
        "segment_ids": np.zeros((rows, width), np.int32),
        "targets": np.zeros((rows, new), np.int32),
        "loss_mask": np.zeros((rows, new), np.bool_),
    }
    for row in range(rows):
        prompt, n = list(prompts[row // num_samples]), int(lengths[row])
        completion = list(completions[row, :n])
        ids = prompt + completion[:-1]  # the last completion token is only a target
        start = prompt_len - len(prompt)
        out["inputs"][row, start:start + len(ids)] = ids
        out["positions"][row, start:start + len(ids)] = np.arange(len(ids))
        out["segment_ids"][row, start:start + len(ids)] = 1
        out["targets"][row, :n] = completion
        out["loss_mask"][row, :n] = True
    return out
