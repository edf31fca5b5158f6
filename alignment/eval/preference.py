"""Reward-model pairwise accuracy on preference pairs."""
from __future__ import annotations

import numpy as np


def pairwise_accuracy(chosen: np.ndarray, rejected: np.ndarray) -> dict:
    """Fraction of pairs where the chosen response scores higher. A tie counts one half (what a coin flip
    between the two would score), so a constant reward model gets 0.5 rather than 0 or 1; ties are counted."""
    chosen, rejected = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
    if chosen.shape != rejected.shape or chosen.ndim != 1 or chosen.size == 0:
        raise ValueError(f"need two equal-length non-empty 1-D score arrays, got {chosen.shape} and "
                         f"{rejected.shape}")
    if not (np.all(np.isfinite(chosen)) and np.all(np.isfinite(rejected))):
        raise ValueError("reward scores contain NaN or inf")
    wins = (chosen > rejected).astype(np.float64) + 0.5 * (chosen == rejected)
    return {"accuracy": float(wins.mean()), "pairs": int(chosen.size), "ties": int(np.sum(chosen == rejected)),
            "mean_margin": float(np.mean(chosen - rejected))}
