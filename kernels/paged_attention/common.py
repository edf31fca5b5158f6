"""What the Pallas paged-attention kernels share: the head-major layout of the queries around the kernels.

Inside the kernels the queries of one kv head form one [M, head_dim] tile, M = q_len * groups (query t of head
h * groups + g is tile row t * groups + g), so a kv page is read once for all the query heads that share it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def group_queries(q: jax.Array, kv_heads: int) -> jax.Array:
    """q [rows, q_len, heads, head_dim] -> [rows, kv_heads, q_len * groups, head_dim]."""
    rows, q_len, heads, head_dim = q.shape
    grouped = q.reshape(rows, q_len, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 1, 3, 4)
    return grouped.reshape(rows, kv_heads, q_len * (heads // kv_heads), head_dim)


def ungroup_queries(out: jax.Array, q_len: int) -> jax.Array:
    """The inverse of `group_queries`: [rows, kv_heads, q_len * groups, head_dim] -> [rows, q_len, heads, hd]."""
    rows, kv_heads, m, head_dim = out.shape
    grouped = out.reshape(rows, kv_heads, q_len, m // q_len, head_dim).transpose(0, 2, 1, 3, 4)
    return grouped.reshape(rows, q_len, kv_heads * (m // q_len), head_dim)


def grouped_positions(q_positions: jax.Array, groups: int) -> jax.Array:
    """[rows, q_len] -> [rows, q_len * groups]: each tile row's query position."""
    return jnp.repeat(q_positions, groups, axis=1)


def pages_used(kv_lens: jax.Array, q_positions: jax.Array, page_size: int) -> jax.Array:
    """[rows] int32: pages holding a key some query of the row may see (keys < kv_len and <= the last position)."""
    last = jnp.minimum(kv_lens, jnp.max(q_positions, axis=1) + 1)
    return jnp.maximum(-(-last // page_size), 0).astype(jnp.int32)
