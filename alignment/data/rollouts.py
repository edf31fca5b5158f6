"""Rollouts -> training rows: prompt + completion per row, loss on the completion tokens only."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def rollout_rows(prompts: Sequence[Sequence[int]], completions: np.ndarray, lengths: np.ndarray, num_samples: int,
                 max_prompt: int, max_new: int) -> dict[str, np.ndarray]:
    """Rows [prompts * num_samples, max_prompt + max_new - 1] of next-token data.

    Row p * num_samples + g holds prompt p followed by its completion g (`completions` [rows, >= length]).
    `loss_mask[t]` is True where `targets[t]` is a completion token; `completion_index[t]` is that token's
    index within the completion (used to align per-token arrays of the completion with the rows).
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

