"""Fused output-head log-probs, entropy and top-K KL as Pallas kernels for GPUs (Triton lowering).

Each program holds a block of rows and loops over the other axis inside the kernel:
  forward   grid (token blocks,): loop over vocabulary blocks with an online log-sum-exp, picking up
            the target logit and the logits at the reference's top-K ids as their blocks pass
  dhidden   grid (token blocks,): loop over vocabulary blocks, recomputing logits
  dW        grid (vocabulary blocks,): loop over token blocks, recomputing logits
Recomputing in both backward kernels avoids atomics. Every matmul runs over the hidden size in chunks of
`block_d`, so no tile holds a whole hidden row: register tiles stay [block_n, block_v] and
[block_d, block_v] whatever D is (Triton needs power-of-two tile shapes and keeps tiles in registers and
shared memory; a [64, 4096] bf16 row block would need 512 KiB). D is zero-padded to a multiple of block_d
where it is not one (a copy of W: 896, 3584, 4096, 5120 and 8192 need none at block_d 128). The backward
kernels accumulate dhidden and dW in float32 outputs, one [rows, block_d] or [block_d, block_v] chunk at a
time, each program on its own rows or columns (no other program writes there); they are cast to the input
dtypes outside.
With the top-K, `topk` = K (static) and the kernels take ids [*, Kp] (and kl_coef in backward);
the [N, K] KL math around them is in common.py.

Checked by cross-lowering on a CPU host (tests/test_kernels_lowering.py; JAX 0.10.2): the Pallas ->
Triton lowering (power-of-two tiles, supported primitives) for fp32 and bf16, hidden sizes 64..8192 and
not-power-of-two ones (896, 3584), N and V not divisible by the blocks. Triton's own compile to PTX (and
its shared-memory limit) runs only on a GPU: `benchmarks/device_check.py`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from alignment_kernels.logprob_kl import common

# Elements of a [block_n, Kp] top-K tile (ids, their logits, kl_coef): with K 500 (Kp 512) block_n drops
# to 32 so the three stay within registers beside the [block_n, block_v] logits.
TOPK_TILE = 2**14


def _logits(h_ref, rows, w_ref, cols, block_d, temperature):
    """h_ref[rows] @ w_ref[:, cols] / temperature as [rows, cols] float32, summed over chunks of block_d."""
    h_dtype = h_ref.dtype

    def body(c, z):
        d = pl.ds(c * block_d, block_d)
        return z + jnp.dot(h_ref[rows, d], w_ref[d, cols].astype(h_dtype), preferred_element_type=jnp.float32)

    n = h_ref.shape[0] if rows == slice(None) else rows.size
    v = w_ref.shape[1] if cols == slice(None) else cols.size
    z = jax.lax.fori_loop(0, h_ref.shape[1] // block_d, body, jnp.zeros((n, v), jnp.float32))
    return z / temperature


def _zero(ref, axis, block_d):
    """ref[...] = 0, one block_d chunk of `axis` at a time."""
    shape = list(ref.shape)
    shape[axis] = block_d

    def body(c, carry):
        index = [slice(None)] * 2
        index[axis] = pl.ds(c * block_d, block_d)
        ref[tuple(index)] = jnp.zeros(shape, ref.dtype)
        return carry

    jax.lax.fori_loop(0, ref.shape[axis] // block_d, body, 0)


def _forward_kernel(h_ref, w_ref, t_ref, *refs, temperature, vocab, block_v, block_d, topk):
    ids_ref, (lse_ref, logp_ref, ent_ref, *z_topk_ref) = (refs[0], refs[1:]) if topk else (None, refs)
    targets = t_ref[...][:, None]
    ids = ids_ref[...] if topk else None

    def body(j, carry):
        stats, z_topk = carry
        z = _logits(h_ref, slice(None), w_ref, pl.ds(j * block_v, block_v), block_d, temperature)
        cols = j * block_v + jnp.arange(block_v)[None, :]
        if topk:
            z_topk = common.topk_pick(z_topk, z, cols, ids, topk)
        return common.stats_step(stats, z, cols, targets, vocab), z_topk

    init = (common.stats_init(h_ref.shape[0]), jnp.zeros(ids.shape, jnp.float32) if topk else None)
    stats, z_topk = jax.lax.fori_loop(0, w_ref.shape[1] // block_v, body, init)
    lse, logp, entropy = common.stats_finish(*stats)
    lse_ref[...], logp_ref[...], ent_ref[...] = lse[:, 0], logp[:, 0], entropy[:, 0]
    if topk:
        z_topk_ref[0][...] = z_topk


def _dh_kernel(h_ref, w_ref, t_ref, lse_ref, g_ref, ge_ref, geh_ref, *refs, temperature, vocab, block_v, block_d,
               topk):
    *topk_refs, dh_ref = refs  # dh_ref [block_n, D] float32
    targets = t_ref[...][:, None]
    per_row = [ref[...][:, None] for ref in (lse_ref, g_ref, ge_ref, geh_ref)]
    kl_grad = (*(ref[...] for ref in topk_refs), topk) if topk else None
    _zero(dh_ref, 1, block_d)

    def body(j, carry):
        cols = pl.ds(j * block_v, block_v)
        col_ids = j * block_v + jnp.arange(block_v)[None, :]
        z = _logits(h_ref, slice(None), w_ref, cols, block_d, temperature)
        dz = common.dlogits(z, col_ids, targets, vocab, *per_row, temperature, kl_grad).astype(h_ref.dtype)

        def add(c, carry):
            d = pl.ds(c * block_d, block_d)
            w = w_ref[d, cols].astype(h_ref.dtype)
            dh_ref[:, d] += jnp.dot(dz, w.T, preferred_element_type=jnp.float32)
            return carry

        return jax.lax.fori_loop(0, h_ref.shape[1] // block_d, add, carry)

    jax.lax.fori_loop(0, w_ref.shape[1] // block_v, body, 0)


def _dw_kernel(h_ref, w_ref, t_ref, lse_ref, g_ref, ge_ref, geh_ref, *refs, temperature, vocab, block_n, block_d,
               topk):
    *topk_refs, dw_ref = refs  # w_ref, dw_ref [D, block_v]; dw_ref float32
    block_v = w_ref.shape[1]
    col_ids = pl.program_id(0) * block_v + jnp.arange(block_v)[None, :]
    _zero(dw_ref, 0, block_d)

    def body(i, carry):
        rows = pl.ds(i * block_n, block_n)
        per_row = [ref[rows][:, None] for ref in (t_ref, lse_ref, g_ref, ge_ref, geh_ref)]
        kl_grad = (*(ref[rows, :] for ref in topk_refs), topk) if topk else None
        z = _logits(h_ref, rows, w_ref, slice(None), block_d, temperature)
        dz = common.dlogits(z, col_ids, per_row[0], vocab, *per_row[1:], temperature, kl_grad).astype(h_ref.dtype)

        def add(c, carry):
            d = pl.ds(c * block_d, block_d)
            dw_ref[d, :] += jnp.dot(h_ref[rows, d].T, dz, preferred_element_type=jnp.float32)
            return carry

        return jax.lax.fori_loop(0, h_ref.shape[1] // block_d, add, carry)

    jax.lax.fori_loop(0, h_ref.shape[0] // block_n, body, 0)


def _params():
    return plgpu.CompilerParams(num_warps=4, num_stages=2)


def _pad_hidden_size(hidden, unembedding, block_d):
    """Zero-pad D of hidden [N, D] and unembedding [D, V] to a multiple of block_d (zeros add nothing)."""
    pad = -hidden.shape[1] % block_d
    if not pad:
        return hidden, unembedding
    return jnp.pad(hidden, [(0, 0), (0, pad)]), jnp.pad(unembedding, [(0, pad), (0, 0)])


def logprob_kl(hidden, unembedding, targets, ref_topk_ids=None, ref_topk_logprobs=None, *,
               temperature: float = 1.0, with_entropy: bool = False, block_n: int = 64, block_v: int = 128,
               block_d: int = 128, interpret: bool = False):
    """Same contract as `reference.logprob_kl`. Block sizes must be powers of two (Triton tiles)."""
    for name, size in (("block_n", block_n), ("block_v", block_v), ("block_d", block_d)):
        if size < 1 or size & (size - 1):
            raise ValueError(f"logprob_kl pallas_gpu: {name}={size} must be a power of two")
    topk = 0 if ref_topk_ids is None else ref_topk_ids.shape[1]
    if topk:
        block_n = min(block_n, max(16, TOPK_TILE // common.topk_width(topk)))
    kw = dict(temperature=float(temperature), vocab=unembedding.shape[1], block_d=block_d, topk=topk)

    def forward(h, w, t, ids):
        n, d = h.shape
        row_vec = pl.BlockSpec((block_n,), lambda i: (i,))
        in_specs = [pl.BlockSpec((block_n, d), lambda i: (i, 0)), pl.BlockSpec(w.shape, lambda i: (0, 0)), row_vec]
        out_specs, out_shape = [row_vec] * 3, [jax.ShapeDtypeStruct((n,), jnp.float32)] * 3
        operands = [h, w, t]
        if topk:
            row_slots = pl.BlockSpec((block_n, ids.shape[1]), lambda i: (i, 0))
            in_specs, out_specs, operands = in_specs + [row_slots], out_specs + [row_slots], operands + [ids]
            out_shape = out_shape + [jax.ShapeDtypeStruct(ids.shape, jnp.float32)]
        outs = pl.pallas_call(
            functools.partial(_forward_kernel, block_v=block_v, **kw),
            grid=(n // block_n,), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
            compiler_params=_params(), interpret=interpret, name="logprob_forward",
        )(*operands)
        return (*outs[:3], outs[3] if topk else None)

    def backward(h, w, t, lse, g, ge, geh, ids, kl_coef):
        n, d = h.shape
        topk_operands = [ids, kl_coef] if topk else []
        row_vec = pl.BlockSpec((block_n,), lambda i: (i,))
        row_slots = [pl.BlockSpec((block_n, x.shape[1]), lambda i: (i, 0)) for x in topk_operands]
        dh = pl.pallas_call(
            functools.partial(_dh_kernel, block_v=block_v, **kw),
            grid=(n // block_n,),
            in_specs=[pl.BlockSpec((block_n, d), lambda i: (i, 0)), pl.BlockSpec(w.shape, lambda i: (0, 0))]
                     + [row_vec] * 5 + row_slots,
            out_specs=pl.BlockSpec((block_n, d), lambda i: (i, 0)),
            out_shape=jax.ShapeDtypeStruct(h.shape, jnp.float32),
            compiler_params=_params(), interpret=interpret, name="logprob_dhidden",
        )(h, w, t, lse, g, ge, geh, *topk_operands)
        all_rows = pl.BlockSpec((n,), lambda j: (0,))
        all_slots = [pl.BlockSpec(x.shape, lambda j: (0, 0)) for x in topk_operands]
        dw = pl.pallas_call(
            functools.partial(_dw_kernel, block_n=block_n, **kw),
            grid=(w.shape[1] // block_v,),
            in_specs=[pl.BlockSpec(h.shape, lambda j: (0, 0)), pl.BlockSpec((d, block_v), lambda j: (0, j))]
                     + [all_rows] * 5 + all_slots,
            out_specs=pl.BlockSpec((d, block_v), lambda j: (0, j)),
            out_shape=jax.ShapeDtypeStruct(w.shape, jnp.float32),
            compiler_params=_params(), interpret=interpret, name="logprob_dw",
        )(h, w, t, lse, g, ge, geh, *topk_operands)
        return dh.astype(h.dtype), dw.astype(w.dtype)

    fn = common.make_logprob(forward, backward, block_n, block_v)
    hidden, unembedding = _pad_hidden_size(hidden, unembedding, block_d)
    return fn(hidden, unembedding, targets, ref_topk_ids, ref_topk_logprobs, with_entropy=with_entropy)
