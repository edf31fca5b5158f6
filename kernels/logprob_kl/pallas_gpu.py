"""Fused output-head log-probs, entropy and top-K KL as Pallas kernels for GPUs (Triton lowering).

Each program holds a block of rows and loops over the other axis inside the kernel:
  forward   grid (token blocks,): loop over vocabulary blocks with an online log-sum-exp, picking up
            the target logit and the logits at the reference's top-K ids as their blocks pass
  dhidden   grid (token blocks,): loop over vocabulary blocks, recomputing logits
  dW        grid (vocabulary blocks,): loop over token blocks, recomputing logits
Recomputing in both backward kernels avoids atomics. A block holds whole hidden rows [block, D].
With the top-K, `topk` = K (static) and the kernels take ids [*, Kp] (and kl_coef in backward);
the [N, K] KL math around them is in common.py.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.logprob_kl import common


def _forward_kernel(h_ref, w_ref, t_ref, *refs, temperature, vocab, block_v, topk):
    ids_ref, (lse_ref, logp_ref, ent_ref, *z_topk_ref) = (refs[0], refs[1:]) if topk else (None, refs)
    h, targets = h_ref[...], t_ref[...][:, None]
    ids = ids_ref[...] if topk else None

    def body(j, carry):
        stats, z_topk = carry
        z = common.logits(h, w_ref[:, pl.ds(j * block_v, block_v)], temperature)
        cols = j * block_v + jnp.arange(block_v)[None, :]
        if topk:
            z_topk = common.topk_pick(z_topk, z, cols, ids, topk)
        return common.stats_step(stats, z, cols, targets, vocab), z_topk

    init = (common.stats_init(h.shape[0]), jnp.zeros(ids.shape, jnp.float32) if topk else None)
    stats, z_topk = jax.lax.fori_loop(0, w_ref.shape[1] // block_v, body, init)
    lse, logp, entropy = common.stats_finish(*stats)
    lse_ref[...], logp_ref[...], ent_ref[...] = lse[:, 0], logp[:, 0], entropy[:, 0]
    if topk:
        z_topk_ref[0][...] = z_topk


def _dh_kernel(h_ref, w_ref, t_ref, lse_ref, g_ref, ge_ref, geh_ref, *refs, temperature, vocab, block_v, topk):
    *topk_refs, dh_ref = refs
    h, targets = h_ref[...], t_ref[...][:, None]
    per_row = [ref[...][:, None] for ref in (lse_ref, g_ref, ge_ref, geh_ref)]
    kl_grad = (*(ref[...] for ref in topk_refs), topk) if topk else None

    def body(j, dh):
        w = w_ref[:, pl.ds(j * block_v, block_v)]
        cols = j * block_v + jnp.arange(block_v)[None, :]
        dz = common.dlogits(common.logits(h, w, temperature), cols, targets, vocab, *per_row, temperature, kl_grad)
        return dh + jnp.dot(dz.astype(w.dtype), w.T, preferred_element_type=jnp.float32)

    dh = jax.lax.fori_loop(0, w_ref.shape[1] // block_v, body, jnp.zeros(h.shape, jnp.float32))
    dh_ref[...] = dh.astype(dh_ref.dtype)


def _dw_kernel(h_ref, w_ref, t_ref, lse_ref, g_ref, ge_ref, geh_ref, *refs, temperature, vocab, block_n, topk):
    *topk_refs, dw_ref = refs
    w = w_ref[...]
    block_v = w.shape[1]
    cols = pl.program_id(0) * block_v + jnp.arange(block_v)[None, :]

    def body(i, dw):
        rows = pl.ds(i * block_n, block_n)
        h = h_ref[rows, :]
        per_row = [ref[rows][:, None] for ref in (t_ref, lse_ref, g_ref, ge_ref, geh_ref)]
        kl_grad = (*(ref[rows, :] for ref in topk_refs), topk) if topk else None
        dz = common.dlogits(common.logits(h, w, temperature), cols, per_row[0], vocab, *per_row[1:], temperature,
                            kl_grad)
        return dw + jnp.dot(h.T, dz.astype(h.dtype), preferred_element_type=jnp.float32)

    dw = jax.lax.fori_loop(0, h_ref.shape[0] // block_n, body, jnp.zeros(w.shape, jnp.float32))
    dw_ref[...] = dw.astype(dw_ref.dtype)


def _params():
    return plgpu.CompilerParams(num_warps=4, num_stages=2)


def logprob_kl(hidden, unembedding, targets, ref_topk_ids=None, ref_topk_logprobs=None, *,
               temperature: float = 1.0, with_entropy: bool = False, block_n: int = 64, block_v: int = 128,
               interpret: bool = False):
    """Same contract as `reference.logprob_kl`."""
    topk = 0 if ref_topk_ids is None else ref_topk_ids.shape[1]
    kw = dict(temperature=float(temperature), vocab=unembedding.shape[1], topk=topk)

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
            out_shape=jax.ShapeDtypeStruct(h.shape, h.dtype),
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
            out_shape=jax.ShapeDtypeStruct(w.shape, w.dtype),
            compiler_params=_params(), interpret=interpret, name="logprob_dw",
        )(h, w, t, lse, g, ge, geh, *topk_operands)
        return dh, dw

    fn = common.make_logprob(forward, backward, block_n, block_v)
    return fn(hidden, unembedding, targets, ref_topk_ids, ref_topk_logprobs, with_entropy=with_entropy)
