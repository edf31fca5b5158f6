"""Attention by implementation name, chosen per backend.

Names: "reference" (dense oracle), "xla" (blockwise flash in pure JAX, the CPU default),
"pallas_gpu", "pallas_tpu", "pallas" (this backend's Pallas flavour), "cudnn"
(`jax.nn.dot_product_attention` with the cuDNN backend). A name that cannot run on this backend
falls back to "xla" with a warning; `interpret=True` runs Pallas kernels in interpret mode instead.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from alignment_kernels import dispatch
from alignment_kernels.attention import pallas_gpu, pallas_tpu, reference, xla


def cudnn(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *, implementation="cudnn"):
    """jax.nn.dot_product_attention with an explicit [batch, 1, q_len, kv_len] mask (GQA is native)."""
    allowed = reference.mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions)[:, None]
    out = jax.nn.dot_product_attention(q, k, v, mask=allowed, implementation=implementation)
    return jnp.where((q_segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)


IMPLEMENTATIONS: dict[str, Callable] = {
    "reference": reference.attention,
    "xla": xla.attention,
    "pallas_gpu": pallas_gpu.attention,
    "pallas_tpu": pallas_tpu.attention,
    "cudnn": cudnn,
}
# Pallas calls are opaque to XLA's partitioner; callers with a sharded model wrap these in shard_map.
NEEDS_SHARD_MAP = ("pallas_gpu", "pallas_tpu")


def get_impl(name: str | None = None, *, interpret: bool = False) -> tuple[str, Callable]:
    """(chosen name, fn(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions))."""
    return dispatch.pick("attention", name, IMPLEMENTATIONS, interpret=interpret)


def attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *,
              impl: str | None = None, interpret: bool = False) -> jax.Array:
    """q [batch, q_len, heads, head_dim], k/v [batch, kv_len, kv_heads, head_dim] -> like q."""
    return get_impl(impl, interpret=interpret)[1](q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
