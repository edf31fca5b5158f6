"""Paged attention as a Pallas kernel for GPUs (Triton lowering).

grid (rows, kv_heads, query blocks): each program holds one block of the [M, head_dim] query tile of a kv head
(`common.group_queries`; M padded to a power of two, at least 16 for the tensor-core dot) and loops over the
row's pages up to the last one its queries may see, reading each page's number from the row's page table and
loading that page of the shared cache directly, with an online softmax. Pages must hold a power of two >= 16
tokens (the dot's smallest tile). Pallas calls are not partitioned by XLA: callers run this per device.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from alignment_kernels.attention import common as flash
from alignment_kernels.paged_attention import common

BLOCK_M = 64  # query tile rows per program, at most


def _kernel(table_ref, len_ref, pos_ref, q_ref, k_ref, v_ref, o_ref, *, scale, page_size):
    q = q_ref[...]
    positions = pos_ref[...][:, None]
    kv_len = len_ref[...]
    last = jnp.minimum(kv_len, jnp.max(positions) + 1)  # keys past the block's last query are never seen

    def body(p, carry):
        page = table_ref[p]
        keys = p * page_size + jnp.arange(page_size, dtype=jnp.int32)[None, :]
        allowed = (keys < kv_len) & (keys <= positions)
        s = jnp.dot(q, k_ref[page].T, preferred_element_type=jnp.float32) * scale
        return flash.online_softmax_step(*carry, s, allowed, v_ref[page])

    rows, head_dim = q.shape
    init = (jnp.full((rows, 1), flash.MASK_VALUE, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, jnp.maximum(-(-last // page_size), 0), body, init)
    o_ref[...] = flash.finish(m, l, acc)[0].astype(o_ref.dtype)


def _power_of_two(n: int, minimum: int) -> int:
    return max(minimum, 1 << (n - 1).bit_length())


def paged_attention(q, k_pages, v_pages, page_table, kv_lens, q_positions, *, interpret: bool = False):
    """Same contract as `reference.paged_attention`, on one device's rows and pages."""
    rows, q_len, heads, head_dim = q.shape
    kv_heads, num_pages, page_size, _ = k_pages.shape
    if page_size < 16 or page_size & (page_size - 1):
        raise ValueError(f"paged_attention pallas_gpu: page_size must be a power of two >= 16, got {page_size}")
    groups = heads // kv_heads
    m = q_len * groups
    block = min(BLOCK_M, _power_of_two(m, 16))
    padded = -(-m // block) * block
    queries = jnp.pad(common.group_queries(q, kv_heads), ((0, 0), (0, 0), (0, padded - m), (0, 0)))
    # Padding rows of the tile get position -1: they see no key and return 0.
    positions = jnp.pad(common.grouped_positions(q_positions.astype(jnp.int32), groups), ((0, 0), (0, padded - m)),
                        constant_values=-1)
    per_row = _power_of_two(page_table.shape[1], 1)
    table = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, per_row - page_table.shape[1])))
    tile = pl.BlockSpec((None, None, block, head_dim), lambda r, h, i: (r, h, i, 0))
    pool = pl.BlockSpec((None, num_pages, page_size, head_dim), lambda r, h, i: (h, 0, 0, 0))
    out = pl.pallas_call(
        functools.partial(_kernel, scale=head_dim ** -0.5, page_size=page_size),
        grid=(rows, kv_heads, padded // block),
        in_specs=[pl.BlockSpec((None, per_row), lambda r, h, i: (r, 0)), pl.BlockSpec((None,), lambda r, h, i: (r,)),
                  pl.BlockSpec((None, block), lambda r, h, i: (r, i)), tile, pool, pool],
        out_specs=tile,
        out_shape=jax.ShapeDtypeStruct(queries.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2),
        interpret=interpret,
        name="paged_attention",
    )(table, kv_lens.astype(jnp.int32), positions, queries, k_pages, v_pages)
    return common.ungroup_queries(out[:, :, :m], q_len)
