"""Paged attention by implementation name, chosen per backend.

Names: "reference" (float32 oracle), "xla" (gather + dense attention in plain JAX, the CPU default),
"pallas_gpu", "pallas_tpu", "pallas" (this backend's Pallas flavour). A name that cannot run on this backend
falls back to "xla" with a warning; `interpret=True` runs Pallas kernels in interpret mode instead.
"""
from __future__ import annotations

from typing import Callable

import jax

from alignment_kernels import dispatch
from alignment_kernels.paged_attention import pallas_gpu, pallas_tpu, reference, xla

IMPLEMENTATIONS: dict[str, Callable] = {
    "reference": reference.paged_attention,
    "xla": xla.paged_attention,
    "pallas_gpu": pallas_gpu.paged_attention,
    "pallas_tpu": pallas_tpu.paged_attention,
}
# Pallas calls are opaque to XLA's partitioner; callers with a sharded cache run these under shard_map.
NEEDS_SHARD_MAP = ("pallas_gpu", "pallas_tpu")


def get_impl(name: str | None = None, *, interpret: bool = False) -> tuple[str, Callable]:
    """(chosen name, fn(q, k_pages, v_pages, page_table, kv_lens, q_positions))."""
    return dispatch.pick("paged_attention", name, IMPLEMENTATIONS, interpret=interpret)


def paged_attention(q, k_pages, v_pages, page_table, kv_lens, q_positions, *, impl: str | None = None,
                    interpret: bool = False) -> jax.Array:
    """q [rows, q_len, heads, head_dim] over pages [kv_heads, num_pages, page_size, head_dim] -> like q
    (`reference` describes every argument)."""
    return get_impl(impl, interpret=interpret)[1](q, k_pages, v_pages, page_table, kv_lens, q_positions)
