"""Paged attention as a Pallas kernel for TPUs (Mosaic lowering).

grid (rows, kv_heads, pages_per_row), pages last ("arbitrary") with the online softmax's running statistics in
VMEM scratch. The page table, key lengths and pages used per row are scalar-prefetched into SMEM: the index map
of the K and V blocks reads the page number from the table, so each step's block is one page, fetched straight
from the shared cache. Steps past a row's last needed page repeat that page's block index, so the pipeline
fetches nothing for them, and their compute is skipped. The queries of one kv head are one [M, head_dim] tile
(`common.group_queries`). Pallas calls are not partitioned by XLA: callers run this per device (shard_map).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from alignment_kernels.attention import common as flash
from alignment_kernels.paged_attention import common

LANES = 128


def _kernel(table_ref, lens_ref, used_ref, pos_ref, q_ref, k_ref, v_ref, o_ref, m_scr, l_scr, acc_scr, *,
            scale, page_size):
    row, page = pl.program_id(0), pl.program_id(2)

    @pl.when(page == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, flash.MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(page < used_ref[row])
    def _update():
        keys = page * page_size + jax.lax.broadcasted_iota(jnp.int32, (1, page_size), 1)
        allowed = (keys < lens_ref[row]) & (keys <= pos_ref[:, :1])
        s = jnp.dot(q_ref[...], k_ref[...].T, preferred_element_type=jnp.float32) * scale
        m, l, acc = flash.online_softmax_step(m_scr[...], l_scr[...], acc_scr[...], s, allowed, v_ref[...])
        m_scr[...], l_scr[...], acc_scr[...] = m, l, acc

    @pl.when(page == pl.num_programs(2) - 1)
    def _store():
        out, _ = flash.finish(m_scr[...], l_scr[...], acc_scr[...])
        o_ref[...] = out.astype(o_ref.dtype)


def paged_attention(q, k_pages, v_pages, page_table, kv_lens, q_positions, *, interpret: bool = False):
    """Same contract as `reference.paged_attention`, on one device's rows and pages."""
    rows, q_len, heads, head_dim = q.shape
    kv_heads, _, page_size, _ = k_pages.shape
    per_row = page_table.shape[1]
    groups = heads // kv_heads
    m = q_len * groups
    positions = common.grouped_positions(q_positions.astype(jnp.int32), groups)
    used = common.pages_used(kv_lens, q_positions, page_size)

    def page_block(r, h, p, table, lens, used):
        last = jnp.maximum(used[r] - 1, 0)
        return h, table[r * per_row + jnp.minimum(p, last)], 0, 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(rows, kv_heads, per_row),
        in_specs=[pl.BlockSpec((None, m, LANES), lambda r, h, p, *_: (r, 0, 0)),
                  pl.BlockSpec((None, None, m, head_dim), lambda r, h, p, *_: (r, h, 0, 0)),
                  pl.BlockSpec((None, None, page_size, head_dim), page_block),
                  pl.BlockSpec((None, None, page_size, head_dim), page_block)],
        out_specs=pl.BlockSpec((None, None, m, head_dim), lambda r, h, p, *_: (r, h, 0, 0)),
        scratch_shapes=[pltpu.VMEM((m, 1), jnp.float32), pltpu.VMEM((m, 1), jnp.float32),
                        pltpu.VMEM((m, head_dim), jnp.float32)],
    )
    out = pl.pallas_call(
        functools.partial(_kernel, scale=head_dim ** -0.5, page_size=page_size),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((rows, kv_heads, m, head_dim), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="paged_attention",
    )(page_table.reshape(-1).astype(jnp.int32), kv_lens.astype(jnp.int32), used,
      jnp.broadcast_to(positions[..., None], (rows, m, LANES)), common.group_queries(q, kv_heads), k_pages,
      v_pages)
    return common.ungroup_queries(out, q_len)
