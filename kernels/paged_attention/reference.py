"""The oracle: each row's pages gathered into one dense sequence, every step in float32.

Shapes (every implementation):
  q            [rows, q_len, heads, head_dim]      the new tokens' queries
  k_pages      [kv_heads, num_pages, page_size, head_dim]   the cache, shared by all rows
  v_pages      like k_pages
  page_table   [rows, pages_per_row] int32         row r's key position j lies in page page_table[r, j // page_size]
                                                   at offset j % page_size
  kv_lens      [rows] int32                        keys at positions < kv_lens[r] exist
  q_positions  [rows, q_len] int32                 a query attends to the keys at positions <= its own; a
                                                   negative position marks a padding query, which returns 0
Rows are ragged twice over: each has its own number of keys and of real queries (a prefill chunk, one decode
token, or none), so prefill and decode rows can share one call.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def gather_rows(pages: jax.Array, page_table: jax.Array) -> jax.Array:
    """[kv_heads, num_pages, page_size, head_dim] pages -> [rows, pages_per_row * page_size, kv_heads, head_dim]:
    each row's pages in order, one dense sequence per row (key position j at index j)."""
    gathered = pages[:, page_table]  # [kv_heads, rows, pages_per_row, page_size, head_dim]
    kv_heads, rows, per_row, page_size, head_dim = gathered.shape
    return gathered.reshape(kv_heads, rows, per_row * page_size, head_dim).transpose(1, 2, 0, 3)


def mask(kv_lens: jax.Array, q_positions: jax.Array, kv_len: int) -> jax.Array:
    """[rows, q_len, kv_len] bool: key j exists (j < kv_lens) and is not after the query (j <= its position)."""
    keys = jnp.arange(kv_len, dtype=jnp.int32)[None, None, :]
    return (keys < kv_lens[:, None, None]) & (keys <= q_positions[:, :, None])


def paged_attention(q, k_pages, v_pages, page_table, kv_lens, q_positions) -> jax.Array:
    """-> [rows, q_len, heads, head_dim] in q.dtype (see the module docstring)."""
    rows, q_len, heads, head_dim = q.shape
    k, v = (gather_rows(p, page_table).astype(jnp.float32) for p in (k_pages, v_pages))
    groups = heads // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)  # head h reads kv head h // groups
    scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k, precision="highest") / jnp.sqrt(
        float(head_dim))
    allowed = mask(kv_lens, q_positions, k.shape[1])[:, None]
    weights = jnp.where(allowed, jnp.exp(scores - jnp.max(jnp.where(allowed, scores, -jnp.inf), axis=-1,
                                                          keepdims=True, initial=-1e30)), 0.0)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(total > 0, total, 1.0)  # a query with no key (padding) gets all zeros
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision="highest").astype(q.dtype)
