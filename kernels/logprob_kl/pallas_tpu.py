"""Fused output-head log-probs, entropy and top-K KL as Pallas kernels for TPUs (Mosaic lowering).

The TPU style: both axes are grid axes, the reduction axis last ("arbitrary"), running sums in VMEM
scratch. Per-token vectors travel lane-broadcast as [tokens, 128] tiles.
  forward   grid (token blocks, vocab blocks)
  dhidden   grid (token blocks, vocab blocks), accumulating [block_n, D]
  dW        grid (vocab blocks, token blocks), accumulating [D, block_v]
A block holds whole hidden rows, so the blocks' VMEM grows with D: `block_sizes` shrinks block_v, then
block_n, from the requested sizes until the pipelined blocks and scratch fit VMEM_BUDGET, and every call
asks Mosaic for VMEM_LIMIT (XLA's default scoped limit, 16 MiB on v5e and v5p, is too small for a Llama-3
8B head: D 4096 at (256, 512) needs ~30 MiB). With the top-K, `topk` = K (static): the forward kernel picks up the
logits at the reference's top-K ids [*, Kp] into a [block_n, Kp] scratch as their vocabulary blocks
pass, and the backward kernels add kl_coef [*, Kp] at those ids; the [N, K] KL math is in common.py.
Pallas calls are not partitioned by XLA: `alignment/algorithms/logprobs.py` runs this under shard_map.

Checked by cross-lowering on a CPU host (tests/test_kernels_lowering.py; JAX 0.10.2, chip description of
v5e): the Pallas -> Mosaic lowering (block shapes, primitives) for fp32 and bf16, D 896 to 8192, K 64 and
500, N and V not divisible by the blocks, and the VMEM estimate of every call against VMEM_LIMIT for v5e,
v5p and v6e (v4's 16 MiB of VMEM is too small for VMEM_LIMIT). Mosaic's layout passes run only on a TPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from alignment_kernels.logprob_kl import common

LANES = 128
VMEM_LIMIT = 32 * 2**20  # asked of Mosaic for every call: within the VMEM of v5e, v5p and v6e (64+ MiB)
VMEM_BUDGET = 24 * 2**20  # for the pipelined blocks and scratch; the rest is the kernel body's temporaries
_PARAMS = pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=VMEM_LIMIT)


def _tile_bytes(rows: int, cols: int, itemsize: int) -> int:
    """VMEM bytes of a [rows, cols] block: (8, 128) tiles of 32-bit words (16-bit values pack 2 rows)."""
    sublanes = 8 * (4 // itemsize)
    return -(-rows // sublanes) * sublanes * -(-cols // LANES) * LANES * itemsize


def vmem_bytes(block_n: int, block_v: int, d: int, itemsize: int, slots: int) -> int:
    """VMEM of the biggest of the three calls: two buffers per block (inputs and outputs), plus scratch.

    slots: Kp, the top-K width (0 without the top-K)."""
    h, w = _tile_bytes(block_n, d, itemsize), _tile_bytes(d, block_v, itemsize)
    vec = _tile_bytes(block_n, LANES, 4)
    topk = _tile_bytes(block_n, slots, 4) if slots else 0
    forward = 2 * (h + w + 4 * vec + 2 * topk) + 4 * _tile_bytes(block_n, 1, 4) + topk
    dhidden = 2 * (2 * h + w + 5 * vec + 2 * topk) + _tile_bytes(block_n, d, 4)
    dw = 2 * (h + 2 * w + 5 * vec + 2 * topk) + _tile_bytes(d, block_v, 4)
    return max(forward, dhidden, dw)


def block_sizes(block_n: int, block_v: int, d: int, itemsize: int, slots: int) -> tuple[int, int]:
    """(block_n, block_v) at most the requested sizes whose calls fit VMEM_BUDGET: block_v halves down to
    256 first, then block_n to 128, block_v to 128 and block_n to 8 (blocks stay multiples of (8, 128)
    and, as long as they can, fill a 256-wide MXU)."""
    sizes = [block_n, block_v]
    for which, floor in ((1, 256), (0, 128), (1, 128), (0, 8)):
        while vmem_bytes(*sizes, d, itemsize, slots) > VMEM_BUDGET and sizes[which] // 2 >= floor:
            sizes[which] //= 2
    if vmem_bytes(*sizes, d, itemsize, slots) > VMEM_BUDGET:
        raise ValueError(f"logprob_kl pallas_tpu: hidden size {d} ({itemsize}-byte values) does not fit "
                         f"{VMEM_BUDGET // 2**20} MiB of VMEM even at blocks {tuple(sizes)}; use impl='xla'")
    return sizes[0], sizes[1]


def _forward_kernel(h_ref, w_ref, t_ref, *refs, temperature, vocab, topk):
    if topk:
        ids_ref, lse_ref, logp_ref, ent_ref, z_topk_ref, m_scr, l_scr, s1_scr, zt_scr, z_topk_scr = refs
    else:
        lse_ref, logp_ref, ent_ref, m_scr, l_scr, s1_scr, zt_scr = refs
    j = pl.program_id(1)
    scratch = (m_scr, l_scr, s1_scr, zt_scr)

    @pl.when(j == 0)
    def _init():
        for ref, value in zip(scratch, common.stats_init(m_scr.shape[0])):
            ref[...] = value
        if topk:
            z_topk_scr[...] = jnp.zeros(z_topk_scr.shape, jnp.float32)

    block_v = w_ref.shape[1]
    cols = j * block_v + jax.lax.broadcasted_iota(jnp.int32, (1, block_v), 1)
    z = common.logits(h_ref[...], w_ref[...], temperature)
    stats = common.stats_step(tuple(ref[...] for ref in scratch), z, cols, t_ref[:, :1], vocab)
    for ref, value in zip(scratch, stats):
        ref[...] = value
    if topk:
        z_topk_scr[...] = common.topk_pick(z_topk_scr[...], z, cols, ids_ref[...], topk)

    @pl.when(j == pl.num_programs(1) - 1)
    def _store():
        for ref, value in zip((lse_ref, logp_ref, ent_ref), common.stats_finish(*stats)):
            ref[...] = jnp.broadcast_to(value, ref.shape)
        if topk:
            z_topk_ref[...] = z_topk_scr[...]


def _dz(h_ref, w_ref, in_refs, col_block, temperature, vocab, topk):
    """in_refs: the lane-broadcast (targets, lse, g_logp, g_ent, g_ent_h), then (ids, kl_coef) with the top-K."""
    block_v = w_ref.shape[1]
    cols = col_block * block_v + jax.lax.broadcasted_iota(jnp.int32, (1, block_v), 1)
    t, lse, g, ge, geh = (ref[:, :1] for ref in in_refs[:5])
    kl_grad = (*(ref[...] for ref in in_refs[5:]), topk) if topk else None
    return common.dlogits(common.logits(h_ref[...], w_ref[...], temperature), cols, t, vocab, lse, g, ge, geh,
                          temperature, kl_grad)


def _dh_kernel(h_ref, w_ref, *rest, temperature, vocab, topk):
    *in_refs, dh_ref, dh_scr = rest
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        dh_scr[...] = jnp.zeros(dh_scr.shape, jnp.float32)

    dz = _dz(h_ref, w_ref, in_refs, j, temperature, vocab, topk)
    w = w_ref[...]
    dh_scr[...] += jnp.dot(dz.astype(w.dtype), w.T, preferred_element_type=jnp.float32)

    @pl.when(j == pl.num_programs(1) - 1)
    def _store():
        dh_ref[...] = dh_scr[...].astype(dh_ref.dtype)


def _dw_kernel(h_ref, w_ref, *rest, temperature, vocab, topk):
    *in_refs, dw_ref, dw_scr = rest
    i = pl.program_id(1)

    @pl.when(i == 0)
    def _init():
        dw_scr[...] = jnp.zeros(dw_scr.shape, jnp.float32)

    dz = _dz(h_ref, w_ref, in_refs, pl.program_id(0), temperature, vocab, topk)
    h = h_ref[...]
    dw_scr[...] += jnp.dot(h.T, dz.astype(h.dtype), preferred_element_type=jnp.float32)

    @pl.when(i == pl.num_programs(1) - 1)
    def _store():
        dw_ref[...] = dw_scr[...].astype(dw_ref.dtype)


def _lanes(x):
    return jnp.broadcast_to(x[:, None], (x.shape[0], LANES))


def logprob_kl(hidden, unembedding, targets, ref_topk_ids=None, ref_topk_logprobs=None, *,
               temperature: float = 1.0, with_entropy: bool = False, block_n: int = 256, block_v: int = 512,
               interpret: bool = False):
    """Same contract as `reference.logprob_kl`."""
    topk = 0 if ref_topk_ids is None else ref_topk_ids.shape[1]
    kw = dict(temperature=float(temperature), vocab=unembedding.shape[1], topk=topk)
    itemsize = max(jnp.dtype(hidden.dtype).itemsize, jnp.dtype(unembedding.dtype).itemsize)
    block_n, block_v = block_sizes(block_n, block_v, hidden.shape[1], itemsize, topk and common.topk_width(topk))
    mode = pltpu.InterpretParams() if interpret else False

    def forward(h, w, t, ids):
        (n, d), vp = h.shape, w.shape[1]
        vec = pl.BlockSpec((block_n, LANES), lambda i, j: (i, 0))
        in_specs = [pl.BlockSpec((block_n, d), lambda i, j: (i, 0)), pl.BlockSpec((d, block_v), lambda i, j: (0, j)),
                    vec]
        out_specs, out_shape = [vec] * 3, [jax.ShapeDtypeStruct((n, LANES), jnp.float32)] * 3
        scratch, operands = [pltpu.VMEM((block_n, 1), jnp.float32)] * 4, [h, w, _lanes(t)]
        if topk:
            slots = pl.BlockSpec((block_n, ids.shape[1]), lambda i, j: (i, 0))
            in_specs, out_specs, operands = in_specs + [slots], out_specs + [slots], operands + [ids]
            out_shape = out_shape + [jax.ShapeDtypeStruct(ids.shape, jnp.float32)]
            scratch = scratch + [pltpu.VMEM((block_n, ids.shape[1]), jnp.float32)]
        outs = pl.pallas_call(
            functools.partial(_forward_kernel, **kw),
            grid=(n // block_n, vp // block_v), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
            scratch_shapes=scratch, compiler_params=_PARAMS, interpret=mode, name="logprob_forward",
        )(*operands)
        return (*(x[:, 0] for x in outs[:3]), outs[3] if topk else None)

    def backward(h, w, t, lse, g, ge, geh, ids, kl_coef):
        (n, d), vp = h.shape, w.shape[1]
        operands = [_lanes(x) for x in (t, lse, g, ge, geh)] + ([ids, kl_coef] if topk else [])
        row_spec = lambda x: pl.BlockSpec((block_n, x.shape[1]), lambda i, j: (i, 0))
        dh = pl.pallas_call(
            functools.partial(_dh_kernel, **kw),
            grid=(n // block_n, vp // block_v),
            in_specs=[pl.BlockSpec((block_n, d), lambda i, j: (i, 0)),
                      pl.BlockSpec((d, block_v), lambda i, j: (0, j))] + [row_spec(x) for x in operands],
            out_specs=pl.BlockSpec((block_n, d), lambda i, j: (i, 0)),
            out_shape=jax.ShapeDtypeStruct(h.shape, h.dtype),
            scratch_shapes=[pltpu.VMEM((block_n, d), jnp.float32)],
            compiler_params=_PARAMS, interpret=mode, name="logprob_dhidden",
        )(h, w, *operands)
        row_spec = lambda x: pl.BlockSpec((block_n, x.shape[1]), lambda j, i: (i, 0))
        dw = pl.pallas_call(
            functools.partial(_dw_kernel, **kw),
            grid=(vp // block_v, n // block_n),
            in_specs=[pl.BlockSpec((block_n, d), lambda j, i: (i, 0)),
                      pl.BlockSpec((d, block_v), lambda j, i: (0, j))] + [row_spec(x) for x in operands],
            out_specs=pl.BlockSpec((d, block_v), lambda j, i: (0, j)),
            out_shape=jax.ShapeDtypeStruct(w.shape, w.dtype),
            scratch_shapes=[pltpu.VMEM((d, block_v), jnp.float32)],
            compiler_params=_PARAMS, interpret=mode, name="logprob_dw",
        )(h, w, *operands)
        return dh, dw

    fn = common.make_logprob(forward, backward, block_n, block_v)
    return fn(hidden, unembedding, targets, ref_topk_ids, ref_topk_logprobs, with_entropy=with_entropy)
