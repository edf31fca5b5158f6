"""PPO with a learned critic, as pure functions over [rows, tokens] arrays of completion tokens.

Token t of a row is the action `targets[t]` taken in the state `inputs[:t + 1]`; `mask` marks the
completion tokens. The reward is the same KL machinery as GRPO's: r_t = -beta * KL_t (the scorer's exact
top-K KL or k3) on every completion token, plus the sequence reward at the last one. GAE turns rewards
and the critic's values into advantages and returns; the policy takes GRPO's clipped surrogate and
aggregation, the critic a clipped squared error:

    delta_t = r_t + gamma * V_{t+1} - V_t          (V = 0 past the last completion token)
    A_t = delta_t + gamma * lam * A_{t+1},   R_t = A_t + V_t
    value loss_t = 0.5 * max((V_t - R_t)^2, (clip(V_t, V_old_t - eps, V_old_t + eps) - R_t)^2)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from alignment.algorithms import grpo


def token_rewards(seq_rewards: jax.Array, kl: jax.Array, mask: jax.Array, beta: float) -> jax.Array:
    """seq_rewards [rows], kl and mask [rows, tokens] -> rewards [rows, tokens]: -beta * KL_t on every
    completion token, plus the sequence reward on the last one (0 off the mask)."""
    mask = mask.astype(jnp.float32)
    tokens = jnp.arange(mask.shape[1])
    last = jnp.max(jnp.where(mask > 0, tokens, -1), axis=1)  # -1 for a row without completion tokens
    at_last = (tokens[None, :] == last[:, None]).astype(jnp.float32)
    return (-beta * kl + seq_rewards[:, None] * at_last) * mask


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float
        ) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over the masked tokens of each row.

    rewards, values, mask [rows, tokens] -> (advantages, returns) [rows, tokens], 0 off the mask. Positions
    off the mask are skipped (the next real token's value and advantage carry across them), and the value
    after a row's last real token is 0: the episode ends there.
    """
    mask = mask.astype(bool)

    def back(carry, column):
        next_value, next_advantage = carry
        r, v, m = column
        advantage = r + gamma * next_value - v + gamma * lam * next_advantage
        return (jnp.where(m, v, next_value), jnp.where(m, advantage, next_advantage)), jnp.where(m, advantage, 0.0)

    zeros = jnp.zeros(rewards.shape[0], jnp.float32)
    columns = (rewards.T.astype(jnp.float32), values.T.astype(jnp.float32), mask.T)
    _, advantages = jax.lax.scan(back, (zeros, zeros), columns, reverse=True)
    advantages = advantages.T
    return advantages, jnp.where(mask, advantages + values, 0.0)


def whiten(advantages: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
    """[rows, tokens] -> zero mean and unit variance over the masked tokens of the whole batch (0 off it)."""
    mask = mask.astype(jnp.float32)
    count = jnp.maximum(mask.sum(), 1.0)
    mean = jnp.sum(advantages * mask) / count
    variance = jnp.sum((advantages - mean) ** 2 * mask) / count
    return (advantages - mean) * jax.lax.rsqrt(variance + eps) * mask


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, clip: float
               ) -> tuple[jax.Array, jax.Array]:
    """Per-token clipped value loss (module docstring) [rows, tokens] and whether the clipped term won."""
    clipped_values = jnp.clip(values, old_values - clip, old_values + clip)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * jnp.maximum(unclipped, clipped), (clipped > unclipped).astype(jnp.float32)


def token_values(model, params, batch: dict) -> jax.Array:
    """The critic's values [rows, tokens] of the states `inputs[:t + 1]` (batch: inputs, positions, segment_ids)."""
    hidden = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
    return model.apply({"params": params}, hidden, method="values")


def critic_loss(model, params, batch: dict, rng: jax.Array, *, clip: float, aggregation: str, max_tokens: int):
    """The critic's update loss; batch (all [rows, tokens]): inputs, positions, segment_ids, loss_mask,
    returns and old_values (the critic's values when the rollouts were scored)."""
    del rng
    values = token_values(model, params, batch)
    per_token, clipped = value_loss(values, batch["old_values"], batch["returns"], clip)
    mask = batch["loss_mask"].astype(jnp.float32)
    metrics = {"value_clip_fraction_sum": jnp.sum(clipped * mask), "tokens": jnp.sum(mask)}
    loss_sum, count = grpo.aggregate(per_token, mask, aggregation, max_tokens)
    return loss_sum, (count, metrics)


def policy_loss(model, params, batch: dict, rng: jax.Array, *, temperature: float, clip_low: float,
                clip_high: float, aggregation: str, max_tokens: int):
    """GRPO's clipped surrogate on per-token GAE advantages (batch fields as `grpo.grpo_loss`); the KL to
    the reference is already in the rewards, so none enters the loss."""
    return grpo.grpo_loss(model, params, batch, rng, temperature=temperature, clip_low=clip_low,
                          clip_high=clip_high, kl_mode="none", beta=0.0, aggregation=aggregation,
                          max_tokens=max_tokens)
