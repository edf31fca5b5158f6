"""Fused output-head log-probs and entropy as Pallas kernels for GPUs (Triton lowering).

Each program holds a block of rows and loops over the other axis inside the kernel:
  forward   grid (token blocks,): loop over vocabulary blocks with an online log-sum-exp
  dhidden   grid (token blocks,): loop over vocabulary blocks, recomputing logits
  dW        grid (vocabulary blocks,): loop over token blocks, recomputing logits
Recomputing in both backward kernels avoids atomics. A block holds whole hidden rows [block, D];
the top-K KL is not in these kernels (see api.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.logprob_kl import common


def _forward_kernel(h_ref, w_ref, t_ref, lse_ref, logp_ref, ent_ref, *, temperature, vocab, block_v):
    h, targets = h_ref[...], t_ref[...][:, None]

    def body(j, carry):
        z = common.logits(h, w_ref[:, pl.ds(j * block_v, block_v)], temperature)
        cols = j * block_v + jnp.arange(block_v)[None, :]
        return common.stats_step(carry, z, cols, targets, vocab)

    stats = jax.lax.fori_loop(0, w_ref.shape[1] // block_v, body, common.stats_init(h.shape[0]))
    lse, logp, entropy = common.stats_finish(*stats)
    lse_ref[...], logp_ref[...], ent_ref[...] = lse[:, 0], logp[:, 0], entropy[:, 0]


def _dh_kernel(h_ref, w_ref, t_ref, lse_ref, g_ref, ge_ref, geh_ref, dh_ref, *, temperature, vocab, block_v):
    h, targets = h_ref[...], t_ref[...][:, None]
    per_row = [ref[...][:, None] for ref in (lse_ref, g_ref, ge_ref, geh_ref)]

    def body(j, dh):
        w = w_ref[:, pl.ds(j * block_v, block_v)]
        cols = j * block_v + jnp.arange(block_v)[None, :]
        dz = common.dlogits(common.logits(h, w, temperature), cols, targets, vocab, *per_row, temperature)
        return dh + jnp.dot(dz.astype(w.dtype), w.T, preferred_element_type=jnp.float32)

    dh = jax.lax.fori_loop(0, w_ref.shape[1] // block_v, body, jnp.zeros(h.shape, jnp.float32))
    dh_ref[...] = dh.astype(dh_ref.dtype)


def _dw_kernel(h_ref, w_ref, t_ref, lse_ref, g_ref, ge_ref, geh_ref, dw_ref, *, temperature, vocab, block_n):
    w = w_ref[...]
    block_v = w.shape[1]
    cols = pl.program_id(0) * block_v + jnp.arange(block_v)[None, :]

    def body(i, dw):
        rows = pl.ds(i * block_n, block_n)
        h = h_ref[rows, :]
        per_row = [ref[rows][:, None] for ref in (t_ref, lse_ref, g_ref, ge_ref, geh_ref)]
        dz = common.dlogits(common.logits(h, w, temperature), cols, per_row[0], vocab, *per_row[1:], temperature)
        return dw + jnp.dot(h.T, dz.astype(h.dtype), preferred_element_type=jnp.float32)

    dw = jax.lax.fori_loop(0, h_ref.shape[0] // block_n, body, jnp.zeros(w.shape, jnp.float32))
    dw_ref[...] = dw.astype(dw_ref.dtype)


def _params():
    return plgpu.CompilerParams(num_warps=4, num_stages=2)


def logprob_kl(hidden, unembedding, targets, ref_topk_ids=None, ref_topk_logprobs=None, *,
               temperature: float = 1.0, with_entropy: bool = False, block_n: int = 64, block_v: int = 128,
               interpret: bool = False):
    """Same contract as `reference.logprob_kl` without the top-K KL (kl is None)."""
    del ref_topk_logprobs
    common.check_no_topk("pallas_gpu", ref_topk_ids)
    vocab = unembedding.shape[1]
    kw = dict(temperature=float(temperature), vocab=vocab)

    def forward(h, w, t):
        n, d = h.shape
        row_vec = pl.BlockSpec((block_n,), lambda i: (i,))
        return pl.pallas_call(
            functools.partial(_forward_kernel, block_v=block_v, **kw),
            grid=(n // block_n,),
            in_specs=[pl.BlockSpec((block_n, d), lambda i: (i, 0)), pl.BlockSpec(w.shape, lambda i: (0, 0)), row_vec],
            out_specs=[row_vec] * 3,
            out_shape=[jax.ShapeDtypeStruct((n,), jnp.float32)] * 3,
            compiler_params=_params(), interpret=interpret, name="logprob_forward",
        )(h, w, t)

    def backward(h, w, t, lse, g, ge, geh):
        n, d = h.shape
        row_vec = pl.BlockSpec((block_n,), lambda i: (i,))
        dh = pl.pallas_call(
            functools.partial(_dh_kernel, block_v=block_v, **kw),
            grid=(n // block_n,),
            in_specs=[pl.BlockSpec((block_n, d), lambda i: (i, 0)), pl.BlockSpec(w.shape, lambda i: (0, 0))]
                     + [row_vec] * 5,
            out_specs=pl.BlockSpec((block_n, d), lambda i: (i, 0)),
            out_shape=jax.ShapeDtypeStruct(h.shape, h.dtype),
            compiler_params=_params(), interpret=interpret, name="logprob_dhidden",
        )(h, w, t, lse, g, ge, geh)
        all_rows = pl.BlockSpec((n,), lambda j: (0,))
        dw = pl.pallas_call(
            functools.partial(_dw_kernel, block_n=block_n, **kw),
            grid=(w.shape[1] // block_v,),
            in_specs=[pl.BlockSpec(h.shape, lambda j: (0, 0)), pl.BlockSpec((d, block_v), lambda j: (0, j))]
                     + [all_rows] * 5,
            out_specs=pl.BlockSpec((d, block_v), lambda j: (0, j)),
            out_shape=jax.ShapeDtypeStruct(w.shape, w.dtype),
            compiler_params=_params(), interpret=interpret, name="logprob_dw",
        )(h, w, t, lse, g, ge, geh)
        return dh, dw

    fn = common.make_logprob(forward, backward, block_n, block_v)
    return fn(hidden, unembedding, targets, with_entropy=with_entropy)
