"""Reward model: Bradley-Terry on chosen/rejected scores plus regression onto annotated absolute scores.

Each batch row packs one pair: the chosen sequence is segment 1 and the rejected one segment 2 (positions
restart at 0 in each), so both go through the trunk in one forward pass. A sequence's reward is the value
head at its last real token.

Per pair, with r = rewards, s = annotated scores normalised to [0, 1], m = an optional margin:

    loss = -log sigmoid(r_chosen - r_rejected - m) + alpha * has_score * ((r_chosen - s_chosen)^2
                                                                         + (r_rejected - s_rejected)^2)

A trained reward model is loaded for scoring by `alignment.rewards.reward_model`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from alignment.data import preference

CHOSEN, REJECTED = 1, 2  # segment ids of a pair's two sequences


def segment_last(values: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """values, segment_ids [batch, seq] -> [batch, num_segments]: the value at each segment's last token.

    Segment k (1-based) is column k-1; a segment absent from a row gives 0.
    """
    seq = values.shape[1]
    ids = jnp.arange(1, num_segments + 1)
    in_segment = segment_ids[:, :, None] == ids  # [b, s, k]
    last = jnp.max(jnp.where(in_segment, jnp.arange(seq)[None, :, None], -1), axis=1)  # [b, k]
    picked = jnp.take_along_axis(values, jnp.maximum(last, 0), axis=1)
    return jnp.where(last >= 0, picked, 0.0)


def pair_rewards(model: nn.Module, params: Any, batch: dict) -> jax.Array:
    """Rewards [pairs, 2] (chosen, rejected) of the pair rows in `batch` (inputs, positions, segment_ids; one pair
    per row, or several: `data.preference.pack_pairs`)."""
    hidden = model.apply({"params": params}, *preference.model_inputs(batch))
    values = model.apply({"params": params}, hidden, method="values")
    k = preference.pairs_per_row(batch)
    return preference.pair_columns(segment_last(values, batch["segment_ids"], 2 * k), k)


def unused_params(model_cfg) -> tuple[str, ...]:
    """Top-level parameters a reward model never reads: the output head of an untied model (frozen in training)."""
    return () if model_cfg.tie_embeddings else ("lm_head",)


def bradley_terry_losses(r_chosen: jax.Array, r_rejected: jax.Array, s_chosen: jax.Array, s_rejected: jax.Array,
                         has_score: jax.Array, margin: jax.Array, alpha: float) -> jax.Array:
    """All inputs [pairs] float -> per-pair loss [pairs] (formula in the module docstring)."""
    ranking = -jax.nn.log_sigmoid(r_chosen - r_rejected - margin)
    regression = (r_chosen - s_chosen) ** 2 + (r_rejected - s_rejected) ** 2
    return ranking + alpha * has_score * regression


def score_pairs(rewards: jax.Array, batch: dict, alpha: float, use_margin: bool) -> tuple[jax.Array, dict]:
    """rewards [pairs, 2] and per-pair batch fields -> (summed loss, metric sums). Used by training and eval."""
    r_c, r_r = rewards[:, 0], rewards[:, 1]
    has_score = batch["has_score"].astype(jnp.float32)
    margin = batch["margin"] if use_margin else jnp.zeros_like(r_c)
    losses = bradley_terry_losses(r_c, r_r, batch["chosen_score"], batch["rejected_score"], has_score, margin, alpha)
    squared_error = has_score * ((r_c - batch["chosen_score"]) ** 2 + (r_r - batch["rejected_score"]) ** 2)
    metrics = {
        "accuracy": jnp.sum(r_c > r_r).astype(jnp.float32),
        "margin": jnp.sum(r_c - r_r),
        "reward_chosen": jnp.sum(r_c),
        "reward_rejected": jnp.sum(r_r),
        "score_sq_error": jnp.sum(squared_error),  # over both sequences of scored pairs
        "scored_pairs": jnp.sum(has_score),
    }
    return jnp.sum(losses), metrics


def reward_loss(model: nn.Module, params: Any, batch: dict, rng: jax.Array, *, alpha: float = 0.0,
                use_margin: bool = False):
    """batch: pair rows [rows, seq] plus per-pair [pairs] chosen_score, rejected_score, has_score, margin.

    Returns (summed loss, (pairs, metric sums)); `finalize_metrics` turns the sums into means.
    """
    del rng
    rewards = pair_rewards(model, params, batch)
    loss_sum, metrics = score_pairs(rewards, batch, alpha, use_margin)
    metrics["tokens"] = jnp.sum(batch["segment_ids"] != 0).astype(jnp.float32)
    return loss_sum, (jnp.asarray(rewards.shape[0], jnp.float32), metrics)


def finalize_metrics(sums: dict) -> dict:
    """Metric sums (with `count` = pairs) -> per-pair means; calibration is the RMSE against absolute scores."""
    out = dict(sums)
    pairs = jnp.maximum(sums["count"], 1.0)
    for key in ("accuracy", "margin", "reward_chosen", "reward_rejected"):
        out[key] = sums[key] / pairs
    out["score_rmse"] = jnp.sqrt(sums["score_sq_error"] / jnp.maximum(2.0 * sums["scored_pairs"], 1.0))
    del out["score_sq_error"]
    return out
