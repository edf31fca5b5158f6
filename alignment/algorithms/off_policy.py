"""Training on tokens another policy sampled: importance weights and the sampler/trainer mismatch.

Three policies meet in an RL update. The sampler mu drew the tokens (the rollout engine: parameters up to
`rl.max_staleness` updates old, maybe in another precision); pi_old is the trainer's policy at the start of
the step's updates (`old_logp`), around which the PPO-style ratio is clipped; pi is the policy being updated.
The loss's own ratio pi / pi_old keeps each update near pi_old; the importance weight pi_old / mu corrects for
the tokens coming from mu, not pi_old (decoupled PPO). Arrays are [rows, tokens] over completion tokens with
`mask` marking real ones; `old_logp` and `sampler_logp` are log-probs of the sampled tokens.

Corrections (`ISCorrection.mode`), the weight w taken per token or per sequence (`level`: the product of the
sequence's token ratios):
  * tis, truncated IS: min(max(w, low), high), so no token's weight exceeds `high`;
  * mis, masked IS: w where low <= w <= high, else 0, so the tokens (or whole sequences) of a sampler that
    strayed too far drop out of the loss's sum (they stay in its normaliser, as TRL counts them);
  * none: weight 1, i.e. the sampled tokens are taken as pi_old's own.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

IS_MODES = ("none", "tis", "mis")
IS_LEVELS = ("token", "sequence")


class ISCorrection(NamedTuple):
    """Which importance-sampling correction the loss applies, with its thresholds on the weight."""

    mode: str = "none"
    level: str = "token"
    low: float = 0.0
    high: float = 2.0


def importance_weights(old_logp: jax.Array, sampler_logp: jax.Array, mask: jax.Array,
                       correction: ISCorrection) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(weights, masked, truncated), each [rows, tokens] and without gradient: the weight that multiplies each
    token's policy loss, and 1.0 where the correction masked or truncated that token's weight."""
    if correction.mode not in IS_MODES or correction.level not in IS_LEVELS:
        raise ValueError(f"importance sampling: mode in {IS_MODES} and level in {IS_LEVELS}, got "
                         f"{correction.mode!r}, {correction.level!r}")
    mask = mask.astype(jnp.float32)
    log_w = jax.lax.stop_gradient(old_logp - sampler_logp) * mask
    if correction.level == "sequence":
        log_w = jnp.broadcast_to(jnp.sum(log_w, axis=1, keepdims=True), mask.shape)
    w = jnp.exp(log_w)  # may overflow to inf for a sequence: both corrections bound it
    outside = ((w < correction.low) | (w > correction.high)).astype(jnp.float32)
    nothing = jnp.zeros_like(mask)
    if correction.mode == "tis":
        return jnp.clip(w, correction.low, correction.high), nothing, outside
    if correction.mode == "mis":
        return jnp.where(outside > 0, 0.0, w), outside, nothing
    return jnp.ones_like(mask), nothing, nothing


def mismatch_sums(trainer_logp: jax.Array, sampler_logp: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """How far the sampler is from the trainer on the sampled tokens, as sums over the masked tokens (the max
    as `mismatch_abs_log_ratio_max`, which micro-batch accumulation combines by max).

    mismatch_kl_sum: the k3 estimate of KL(sampler || trainer), exp(d) - d - 1 with d = trainer - sampler log-prob
    (unbiased for tokens drawn by the sampler, and >= 0); mismatch_abs_log_ratio_sum / _max: |d|.
    """
    real = mask > 0
    d = jnp.where(real, jax.lax.stop_gradient(trainer_logp) - sampler_logp, 0.0)
    return {
        "mismatch_kl_sum": jnp.sum(jnp.expm1(d) - d),
        "mismatch_abs_log_ratio_sum": jnp.sum(jnp.abs(d)),
        "mismatch_abs_log_ratio_max": jnp.max(jnp.abs(d)),
    }
