"""Attention implementations selectable by `ModelConfig.attention_impl`.

Every implementation takes
  q [batch, q_len, heads, head_dim], k and v [batch, kv_len, kv_heads, head_dim],
  q_segment_ids [batch, q_len], kv_segment_ids [batch, kv_len] (0 = padding),
  q_positions [batch, q_len], kv_positions [batch, kv_len]
and returns [batch, q_len, heads, head_dim]. A query attends to keys of its own non-zero segment at
positions <= its own, so packed samples never see each other. Query rows that are padding return 0.

  xla_dense (alias xla)  materialises the [q_len, kv_len] scores; simplest, fine for short sequences
  xla_flash              block-sparse flash attention in pure JAX (kernels/attention/xla.py), linear memory;
                         skips score tiles the mask empties (causal triangle, between packed samples)
  pallas                 this backend's Pallas kernel (GPU or TPU), run per device under shard_map;
                         falls back to xla_flash with a logged warning where none compiles (CPU); on a CPU
                         host, `kernels.dispatch.target_platform` traces the TPU or GPU kernel for lowering
  cudnn                  jax.nn.dot_product_attention on cuDNN; falls back to xla_flash off GPU
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from alignment import sharding
from alignment_kernels.attention import api as kernel_api
from alignment_kernels.attention import xla as flash
from alignment_kernels.attention.reference import mask as attention_mask

AttentionFn = Callable[..., jax.Array]


def xla_dense(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions) -> jax.Array:
    """The reference: materialises [batch, heads, q_len, kv_len] scores; softmax in float32."""
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    q = q.reshape(batch, q_len, kv_heads, groups, head_dim)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32)
    scores = scores * (head_dim ** -0.5)
    mask = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions)[:, None, None]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask, probs, 0.0)  # fully masked (padding) rows give 0, not a uniform average
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)


def shard_over_mesh(fn: AttentionFn) -> AttentionFn:
    """Run `fn` per device under shard_map over the active activation-sharding mesh (if any).

    Batch and heads stay split as the model's rules say; the sequence is gathered, because every
    query needs all keys of its row.
    """

    def run(q, k, v, *vectors):
        context = sharding.current_activation_sharding()
        if context is None:
            return fn(q, k, v, *vectors)
        mesh, rules = context
        q_spec = sharding.logical_to_spec(("batch", None, "act_heads", None), rules)
        kv_spec = sharding.logical_to_spec(("batch", None, "act_kv_heads", None), rules)
        vec_spec = PartitionSpec(q_spec[0], None)
        return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec) + (vec_spec,) * len(vectors),
                             out_specs=q_spec, check_vma=False)(q, k, v, *vectors)

    return run


def _kernel(name: str) -> AttentionFn:
    """An implementation from `kernels.attention`, resolved for the backend when traced."""

    def run(*args):
        chosen, fn = kernel_api.get_impl(name)
        if chosen in kernel_api.NEEDS_SHARD_MAP:
            fn = shard_over_mesh(fn)
        return fn(*args)

    return run


IMPLEMENTATIONS: dict[str, AttentionFn] = {
    "xla": xla_dense,
    "xla_dense": xla_dense,
    "xla_flash": flash.attention,
    "pallas": _kernel("pallas"),
    "cudnn": _kernel("cudnn"),
}


def get_attention(name: str) -> AttentionFn:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention_impl {name!r} is not available; choose from {sorted(IMPLEMENTATIONS)}")
    return IMPLEMENTATIONS[name]
