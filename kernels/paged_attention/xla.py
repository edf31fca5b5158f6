"""Paged attention in plain JAX: each row's pages gathered into a dense sequence, then masked attention with
float32 scores and softmax over the cache's dtype. The CPU default; XLA partitions it like any gather.

Cost: the gather copies every row's `pages_per_row` pages once per call, whatever its own length; a caller
that attends many times to the same pages (a decode loop) can gather once (`reference.gather_rows`) and
attend to the dense copy instead, as `alignment.generation.paged` does on CPU.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from alignment_kernels.paged_attention.reference import gather_rows, mask


def dense_attention(q, k, v, kv_lens, q_positions) -> jax.Array:
    """q [rows, q_len, heads, head_dim] over dense keys and values k, v [rows, kv_len, kv_heads, head_dim] at
    positions 0 .. kv_len - 1, masked as `reference.mask`; both matmuls on q.dtype operands (a cache kept in a
    wider dtype is read as the queries' one), float32 scores and softmax, output in q.dtype."""
    rows, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(rows, q_len, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k.astype(q.dtype), preferred_element_type=jnp.float32)
    allowed = mask(kv_lens, q_positions, k.shape[1])[:, None, None]
    scores = jnp.where(allowed, scores * head_dim ** -0.5, jnp.finfo(jnp.float32).min)
    probs = jnp.where(allowed, jax.nn.softmax(scores, axis=-1), 0.0)  # padding queries: 0, not a uniform mean
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(q.dtype), v.astype(q.dtype), preferred_element_type=jnp.float32)
    return out.reshape(rows, q_len, heads, head_dim).astype(q.dtype)


def paged_attention(q, k_pages, v_pages, page_table, kv_lens, q_positions) -> jax.Array:
    """Same contract as `reference.paged_attention`."""
    return dense_attention(q, gather_rows(k_pages, page_table), gather_rows(v_pages, page_table), kv_lens,
                           q_positions)
