"""The oracle: dense causal attention with segment ids and GQA, all math in float32.

Shapes: q [batch, q_len, heads, head_dim]; k, v [batch, kv_len, kv_heads, head_dim];
segment ids and positions [batch, len]. A query attends to keys of its own non-zero segment at
positions <= its own; padding query rows (segment 0) return 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions) -> jax.Array:
    """[batch, q_len, kv_len] bool."""
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    real = (q_segment_ids != 0)[:, :, None]
    causal = kv_positions[:, None, :] <= q_positions[:, :, None]
    return same & real & causal


def attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions) -> jax.Array:
    """-> [batch, q_len, heads, head_dim] in q.dtype; differentiable by plain autodiff."""
    batch, q_len, heads, head_dim = q.shape
    groups = heads // k.shape[2]
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    k32, v32 = jnp.repeat(k32, groups, axis=2), jnp.repeat(v32, groups, axis=2)  # head h uses kv head h // groups
    scores = jnp.einsum("bqhd,bkhd->bhqk", q32, k32, precision="highest") / jnp.sqrt(float(head_dim))
    allowed = mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions)[:, None]
    scores = jnp.where(allowed, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.where(allowed, jnp.exp(scores - row_max), 0.0)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(total > 0, total, 1.0)  # rows with no allowed key are all zeros
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v32, precision="highest")
    return out.astype(q.dtype)
