"""Flash attention as Pallas kernels for GPUs (Triton lowering), forward and backward.

Layout inside the kernels is head-major, [batch, heads, seq, head_dim]. Each program owns one block
of rows and loops over the other sequence inside the kernel (the Triton style):
  forward   grid (batch, heads, q blocks), loop over key blocks with an online softmax
  dq        grid (batch, heads, q blocks), loop over key blocks
  dk, dv    grid (batch, kv_heads, key blocks), loop over query blocks of every head in the group
Masks follow `reference.mask` (segment ids, causal by position). A program loops only over the span of
blocks from the first to the last (query block, key block) tile holding an allowed pair, found per batch
row before the kernels (`tile_spans`), so the causal upper triangle and the tiles between packed samples
outside that span cost nothing; inside it the mask zeroes what a query must not see.

Checked by cross-lowering on a CPU host (tests/test_kernels_lowering*.py; JAX 0.10.2): the Pallas -> Triton
lowering, forward and backward, fp32 and bf16, head dims 64 and 128, GQA 32/8 and 4/2 and 14/2, lengths no
block divides, inside the sharded SFT / GRPO steps and the generation programs; every tile at most
[64, 128]. Triton's compile to PTX runs only on a GPU (`benchmarks/device_check.py`).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from alignment_kernels.attention import common, reference


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    block_q: int = 64  # query rows per program (forward and backward)
    block_k: int = 64  # key rows per loop step


def tile_spans(q_seg, kv_seg, q_pos, kv_pos, block_q, block_k):
    """The tiles each program visits: (first, end) key blocks per query block, both [batch, nq] int32, and
    (first, end) query blocks per key block, both [batch, nk]; (0, 0) for a block with no allowed pair.

    Vectors [batch, len] padded to whole blocks. The [nq, nk] table of tiles with an allowed pair is reduced
    from one query block's [batch, block_q, kv_len] mask at a time.
    """
    batch, q_len = q_seg.shape
    nq, nk = q_len // block_q, kv_seg.shape[1] // block_k

    def row_of_tiles(vectors):
        allowed = reference.mask(vectors[0], kv_seg, vectors[1], kv_pos)
        return allowed.reshape(batch, block_q, nk, block_k).any(axis=(1, 3))

    by_block = lambda x: jnp.swapaxes(x.reshape(batch, nq, block_q), 0, 1)
    needed = jnp.swapaxes(jax.lax.map(row_of_tiles, (by_block(q_seg), by_block(q_pos))), 0, 1)  # [b, nq, nk]

    def span(axis):
        found, size = needed.any(axis), needed.shape[axis]
        first = jnp.argmax(needed, axis)
        end = size - jnp.argmax(jnp.flip(needed, axis), axis)
        return jnp.where(found, first, 0).astype(jnp.int32), jnp.where(found, end, 0).astype(jnp.int32)

    return span(2), span(1)


def _forward_kernel(first_ref, end_ref, q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, q_pos_ref, kv_pos_ref, o_ref,
                    lse_ref, *, scale, block_k):
    q = q_ref[...]
    q_seg, q_pos = q_seg_ref[...][:, None], q_pos_ref[...][:, None]

    def body(j, carry):
        keys = pl.ds(j * block_k, block_k)
        allowed = common.block_mask(q_seg, q_pos, kv_seg_ref[keys][None, :], kv_pos_ref[keys][None, :])
        s = jnp.dot(q, k_ref[keys, :].T, preferred_element_type=jnp.float32) * scale
        return common.online_softmax_step(*carry, s, allowed, v_ref[keys, :])

    rows, head_dim = q.shape
    init = (jnp.full((rows, 1), common.MASK_VALUE, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32))
    m, l, acc = jax.lax.fori_loop(first_ref[...], end_ref[...], body, init)
    out, lse = common.finish(m, l, acc)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse[:, 0]


def _dq_kernel(first_ref, end_ref, q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, q_pos_ref, kv_pos_ref, lse_ref,
               do_ref, delta_ref, dq_ref, *, scale, block_k):
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    q_seg, q_pos = q_seg_ref[...][:, None], q_pos_ref[...][:, None]

    def body(j, dq):
        keys = pl.ds(j * block_k, block_k)
        k = k_ref[keys, :]
        allowed = common.block_mask(q_seg, q_pos, kv_seg_ref[keys][None, :], kv_pos_ref[keys][None, :])
        _, ds = common.block_grads(q, k, v_ref[keys, :], do, lse, delta, allowed, scale)
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = jax.lax.fori_loop(first_ref[...], end_ref[...], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(first_ref, end_ref, q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, q_pos_ref, kv_pos_ref, lse_ref,
                do_ref, delta_ref, dk_ref, dv_ref, *, scale, block_q, groups):
    k, v = k_ref[...], v_ref[...]
    kv_seg, kv_pos = kv_seg_ref[...][None, :], kv_pos_ref[...][None, :]

    def body(i, carry):
        dk, dv = carry
        rows = pl.ds(i * block_q, block_q)
        allowed = common.block_mask(q_seg_ref[rows][:, None], q_pos_ref[rows][:, None], kv_seg, kv_pos)
        for g in range(groups):  # the query heads sharing this kv head
            q, do = q_ref[g, rows, :], do_ref[g, rows, :]
            p, ds = common.block_grads(q, k, v, do, lse_ref[g, rows][:, None], delta_ref[g, rows][:, None],
                                       allowed, scale)
            dv = dv + jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=jnp.float32)
            dk = dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(first_ref[...], end_ref[...], body, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _compiler_params(head_dim):
    return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, *, blocks, interpret):
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    bq = blocks.block_q
    rows = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i: (b, h, i, 0))
    all_kv = pl.BlockSpec((None, None, kv_len, head_dim), lambda b, h, i: (b, h // groups, 0, 0))
    q_vec = pl.BlockSpec((None, bq), lambda b, h, i: (b, i))
    kv_vec = pl.BlockSpec((None, kv_len), lambda b, h, i: (b, 0))
    span = pl.BlockSpec((None, None), lambda b, h, i: (b, i))
    (first, end), _ = tile_spans(q_seg, kv_seg, q_pos, kv_pos, bq, blocks.block_k)
    return pl.pallas_call(
        functools.partial(_forward_kernel, scale=head_dim ** -0.5, block_k=blocks.block_k),
        grid=(batch, heads, q_len // bq),
        in_specs=[span, span, rows, all_kv, all_kv, q_vec, kv_vec, q_vec, kv_vec],
        out_specs=[rows, pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)],
        compiler_params=_compiler_params(head_dim),
        interpret=interpret,
        name="attention_forward",
    )(first, end, q, k, v, q_seg, kv_seg, q_pos, kv_pos)


def _backward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, lse, d_out, delta, *, blocks, interpret):
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    bq, bk = blocks.block_q, blocks.block_k
    scale = head_dim ** -0.5
    inputs = (q, k, v, q_seg, kv_seg, q_pos, kv_pos, lse, d_out, delta)
    key_spans, query_spans = tile_spans(q_seg, kv_seg, q_pos, kv_pos, bq, bk)

    span = pl.BlockSpec((None, None), lambda b, h, i: (b, i))
    rows = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i: (b, h, i, 0))
    row_vec = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
    all_kv = pl.BlockSpec((None, None, kv_len, head_dim), lambda b, h, i: (b, h // groups, 0, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, block_k=bk),
        grid=(batch, heads, q_len // bq),
        in_specs=[span, span, rows, all_kv, all_kv, pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
                  pl.BlockSpec((None, kv_len), lambda b, h, i: (b, 0)),
                  pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
                  pl.BlockSpec((None, kv_len), lambda b, h, i: (b, 0)), row_vec, rows, row_vec],
        out_specs=rows,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(head_dim),
        interpret=interpret,
        name="attention_dq",
    )(*key_spans, *inputs)

    # One program per key block of one kv head; it reads every query of the heads in its group.
    group_rows = pl.BlockSpec((None, groups, q_len, head_dim), lambda b, kh, j: (b, kh, 0, 0))
    group_vec = pl.BlockSpec((None, groups, q_len), lambda b, kh, j: (b, kh, 0))
    kv_rows = pl.BlockSpec((None, None, bk, head_dim), lambda b, kh, j: (b, kh, j, 0))
    q_all = pl.BlockSpec((None, q_len), lambda b, kh, j: (b, 0))
    kv_vec = pl.BlockSpec((None, bk), lambda b, kh, j: (b, j))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, block_q=bq, groups=groups),
        grid=(batch, kv_heads, kv_len // bk),
        in_specs=[span, span, group_rows, kv_rows, kv_rows, q_all, kv_vec, q_all, kv_vec, group_vec, group_rows,
                  group_vec],
        out_specs=[kv_rows, kv_rows],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(head_dim),
        interpret=interpret,
        name="attention_dkv",
    )(*query_spans, *inputs)
    return dq, dk, dv


def attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *,
              blocks: BlockSizes = BlockSizes(), interpret: bool = False) -> jax.Array:
    """Same contract as `reference.attention`; any lengths (padded to the block sizes)."""
    fn = common.make_attention(functools.partial(_forward, blocks=blocks, interpret=interpret),
                               functools.partial(_backward, blocks=blocks, interpret=interpret),
                               math.lcm(blocks.block_q, blocks.block_k))
    return fn(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
