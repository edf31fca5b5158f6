"""Flash attention as Pallas kernels for TPUs (Mosaic lowering), forward and backward.

The TPU style: both sequences are grid axes, the reduction axis last ("arbitrary"), and running
statistics live in VMEM scratch across its steps. Blocks whose mask is empty skip the matmuls
(causal and cross-segment blocks). Segment ids and positions are broadcast along lanes (queries)
or sublanes (keys) so every block has a TPU-tileable shape. Layout: [batch, heads, seq, head_dim].
  forward  grid (batch, heads, q blocks, k blocks)
  dq       grid (batch, heads, q blocks, k blocks)
  dk, dv   grid (batch, kv_heads, k blocks, groups * q blocks)
Pallas calls are not partitioned by XLA: `api.py` wraps this in `shard_map` over the model mesh.

Checked by cross-lowering on a CPU host (tests/test_kernels_lowering*.py; JAX 0.10.2, chip description of
v5e through Mosaic's TPU-info registry): the Pallas -> Mosaic lowering (block shapes, primitives), forward
and backward, fp32 and bf16, head dims 64 and 128, GQA, lengths no block divides, inside the sharded SFT /
GRPO steps and the generation programs; each call's blocks take under 2 MiB of VMEM (v5e, v5p, v6e).
Mosaic's layout passes run only on a TPU.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from alignment_kernels.attention import common

LANES, SUBLANES = 128, 8


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    block_q: int = 128  # query rows per grid step
    block_k: int = 128  # key rows per grid step


def _mask(q_seg_ref, q_pos_ref, kv_seg_ref, kv_pos_ref):
    return common.block_mask(q_seg_ref[:, :1], q_pos_ref[:, :1], kv_seg_ref[:1, :], kv_pos_ref[:1, :])


def _forward_kernel(q_seg_ref, kv_seg_ref, q_pos_ref, kv_pos_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
                    m_scr, l_scr, acc_scr, *, scale):
    j = pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, common.MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    allowed = _mask(q_seg_ref, q_pos_ref, kv_seg_ref, kv_pos_ref)

    @pl.when(jnp.any(allowed))
    def _update():
        s = jnp.dot(q_ref[...], k_ref[...].T, preferred_element_type=jnp.float32) * scale
        m, l, acc = common.online_softmax_step(m_scr[...], l_scr[...], acc_scr[...], s, allowed, v_ref[...])
        m_scr[...], l_scr[...], acc_scr[...] = m, l, acc

    @pl.when(j == pl.num_programs(3) - 1)
    def _store():
        out, lse = common.finish(m_scr[...], l_scr[...], acc_scr[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def _dq_kernel(q_seg_ref, kv_seg_ref, q_pos_ref, kv_pos_ref, q_ref, k_ref, v_ref, lse_ref, do_ref, delta_ref,
               dq_ref, dq_scr, *, scale):
    j = pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    allowed = _mask(q_seg_ref, q_pos_ref, kv_seg_ref, kv_pos_ref)

    @pl.when(jnp.any(allowed))
    def _update():
        k = k_ref[...]
        _, ds = common.block_grads(q_ref[...], k, v_ref[...], do_ref[...], lse_ref[:, :1], delta_ref[:, :1],
                                   allowed, scale)
        dq_scr[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(j == pl.num_programs(3) - 1)
    def _store():
        dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _dkv_kernel(q_seg_ref, kv_seg_ref, q_pos_ref, kv_pos_ref, q_ref, k_ref, v_ref, lse_ref, do_ref, delta_ref,
                dk_ref, dv_ref, dk_scr, dv_scr, *, scale):
    t = pl.program_id(3)

    @pl.when(t == 0)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    allowed = _mask(q_seg_ref, q_pos_ref, kv_seg_ref, kv_pos_ref)

    @pl.when(jnp.any(allowed))
    def _update():
        q, do = q_ref[...], do_ref[...]
        p, ds = common.block_grads(q, k_ref[...], v_ref[...], do, lse_ref[:, :1], delta_ref[:, :1], allowed, scale)
        dv_scr[...] += jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=jnp.float32)
        dk_scr[...] += jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32)

    @pl.when(t == pl.num_programs(3) - 1)
    def _store():
        dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _lanes(x):
    """[batch, len] -> [batch, len, LANES]: a query-side vector as a TPU tile."""
    return jnp.broadcast_to(x[..., None], x.shape + (LANES,))


def _sublanes(x):
    """[batch, len] -> [batch, SUBLANES, len]: a key-side vector as a TPU tile."""
    return jnp.broadcast_to(x[:, None, :], (x.shape[0], SUBLANES, x.shape[1]))


def _interpret(interpret: bool):
    return pltpu.InterpretParams() if interpret else False


def _forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, *, blocks, interpret):
    batch, heads, q_len, head_dim = q.shape
    groups = heads // k.shape[1]
    bq, bk = blocks.block_q, blocks.block_k
    q_rows = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j: (b, h, i, 0))
    k_rows = pl.BlockSpec((None, None, bk, head_dim), lambda b, h, i, j: (b, h // groups, j, 0))
    q_tile = pl.BlockSpec((None, bq, LANES), lambda b, h, i, j: (b, i, 0))
    k_tile = pl.BlockSpec((None, SUBLANES, bk), lambda b, h, i, j: (b, 0, j))
    lse_tile = pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j: (b, h, i, 0))
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, scale=head_dim ** -0.5),
        grid=(batch, heads, q_len // bq, k.shape[2] // bk),
        in_specs=[q_tile, k_tile, q_tile, k_tile, q_rows, k_rows, k_rows],
        out_specs=[q_rows, lse_tile],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, q_len, LANES), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, head_dim), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret),
        name="attention_forward",
    )(_lanes(q_seg), _sublanes(kv_seg), _lanes(q_pos), _sublanes(kv_pos), q, k, v)
    return out, lse[..., 0]


def _backward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, lse, d_out, delta, *, blocks, interpret):
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    bq, bk = blocks.block_q, blocks.block_k
    nq = q_len // bq
    scale = head_dim ** -0.5
    vectors = (_lanes(q_seg), _sublanes(kv_seg), _lanes(q_pos), _sublanes(kv_pos))
    lse, delta = (jnp.broadcast_to(x[..., None], x.shape + (LANES,)) for x in (lse, delta))
    arrays = (q, k, v, lse, d_out, delta)

    # dq: queries are the parallel axis, keys the reduction.
    q_rows = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j: (b, h, i, 0))
    k_rows = pl.BlockSpec((None, None, bk, head_dim), lambda b, h, i, j: (b, h // groups, j, 0))
    q_stat = pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j: (b, h, i, 0))
    q_tile = pl.BlockSpec((None, bq, LANES), lambda b, h, i, j: (b, i, 0))
    k_tile = pl.BlockSpec((None, SUBLANES, bk), lambda b, h, i, j: (b, 0, j))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale),
        grid=(batch, heads, nq, kv_len // bk),
        in_specs=[q_tile, k_tile, q_tile, k_tile, q_rows, k_rows, k_rows, q_stat, q_rows, q_stat],
        out_specs=q_rows,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret),
        name="attention_dq",
    )(*vectors, *arrays)

    # dk, dv: keys are the parallel axis; the reduction runs over (query head in group, query block).
    head = lambda kh, t: kh * groups + t // nq
    q_rows = pl.BlockSpec((None, None, bq, head_dim), lambda b, kh, j, t: (b, head(kh, t), t % nq, 0))
    k_rows = pl.BlockSpec((None, None, bk, head_dim), lambda b, kh, j, t: (b, kh, j, 0))
    q_stat = pl.BlockSpec((None, None, bq, LANES), lambda b, kh, j, t: (b, head(kh, t), t % nq, 0))
    q_tile = pl.BlockSpec((None, bq, LANES), lambda b, kh, j, t: (b, t % nq, 0))
    k_tile = pl.BlockSpec((None, SUBLANES, bk), lambda b, kh, j, t: (b, 0, j))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale),
        grid=(batch, kv_heads, kv_len // bk, groups * nq),
        in_specs=[q_tile, k_tile, q_tile, k_tile, q_rows, k_rows, k_rows, q_stat, q_rows, q_stat],
        out_specs=[k_rows, k_rows],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, head_dim), jnp.float32), pltpu.VMEM((bk, head_dim), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret),
        name="attention_dkv",
    )(*vectors, *arrays)
    return dq, dk, dv


def attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *,
              blocks: BlockSizes = BlockSizes(), interpret: bool = False) -> jax.Array:
    """Same contract as `reference.attention` on one device's shard; any lengths (padded to the blocks)."""
    fn = common.make_attention(functools.partial(_forward, blocks=blocks, interpret=interpret),
                               functools.partial(_backward, blocks=blocks, interpret=interpret),
                               math.lcm(blocks.block_q, blocks.block_k))
    return fn(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
