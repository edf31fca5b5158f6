"""Fused output head in pure JAX: log-probs, entropy and top-K KL without a [N, V] array.

Forward: for each chunk of `block_n` tokens, scan vocabulary blocks of `block_v` columns with an
online log-sum-exp, picking up the target logit and the logits at the reference top-K ids as their
blocks pass. Backward: for each vocabulary block, recompute its logits chunk by chunk, form the
logit gradient there, and accumulate dhidden [N, D] (float32) and this block's dW [D, block_v].

The last vocabulary block is clamped to end at V (it overlaps the previous one); columns an earlier
block already covered are masked, so W is never padded or copied.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from alignment_kernels.logprob_kl.reference import LogprobKL

DEFAULT_BLOCK_N = 1024
DEFAULT_BLOCK_V = 4096


def _loop_slice(x, start, size, axis, step):
    """x[start:start + size] along `axis`, for a slice taken inside a loop at iteration `step`.

    XLA:CPU has no bf16 dynamic-slice: it slices an upcast float32 operand. When x is loop invariant
    that upcast is hoisted out of the loop, a float32 copy of all of x (1 GiB for W at D 2048,
    V 128256). Tying x to `step` through an optimization barrier keeps the upcast in the loop, fused
    into the slice, so only the block is converted. The barrier copies nothing.
    """
    x, _ = jax.lax.optimization_barrier((x, step))
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _vocab_block(unembedding, i, block_v):
    """(W block [D, block_v], its first column, fresh [block_v] bool: columns no earlier block covered)."""
    vocab = unembedding.shape[1]
    start = jnp.minimum(i * block_v, vocab - block_v)
    w = _loop_slice(unembedding, start, block_v, 1, i)
    fresh = start + jnp.arange(block_v) >= i * block_v
    return w, start, fresh


def _logits(h, w, temperature):
    return jnp.dot(h, w.astype(h.dtype), preferred_element_type=jnp.float32) / temperature


def _topk_in_block(ids, start, fresh_from, block_v):
    """(local column [n, K] clipped into the block, whether the id belongs to this block and is fresh)."""
    local = ids - start
    inside = (local >= 0) & (local < block_v) & (ids >= fresh_from)
    return jnp.clip(local, 0, block_v - 1), inside


def _pad_rows(x, rows):
    if x is None or x.shape[0] == rows:
        return x
    return jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _forward(hidden, unembedding, targets, ref_ids, ref_logp, temperature, block_n, block_v):
    n, vocab = hidden.shape[0], unembedding.shape[1]
    block_n, block_v = min(block_n, n), min(block_v, vocab)
    chunks = -(-n // block_n)
    padded = chunks * block_n
    h, t, ids = (_pad_rows(x, padded) for x in (hidden, targets, ref_ids))
    with_topk = ref_ids is not None

    def chunk_stats(c):
        h_c = _loop_slice(h, c * block_n, block_n, 0, c)
        t_c = jax.lax.dynamic_slice_in_dim(t, c * block_n, block_n)
        ids_c = None if ids is None else jax.lax.dynamic_slice_in_dim(ids, c * block_n, block_n)

        def step(i, carry):
            m, l, s1, zt, zk = carry
            w, start, fresh = _vocab_block(unembedding, i, block_v)
            z = _logits(h_c, w, temperature)  # [block_n, block_v]
            z_fresh = jnp.where(fresh, z, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(z_fresh, axis=-1))  # finite: every block has a fresh column
            e = jnp.exp(z_fresh - m_new[:, None])
            correction = jnp.exp(m - m_new)
            l = l * correction + jnp.sum(e, axis=-1)
            s1 = s1 * correction + jnp.sum(e * jnp.where(fresh, z, 0.0), axis=-1)  # for the entropy
            hit = fresh & (start + jnp.arange(block_v) == t_c[:, None])
            zt = zt + jnp.sum(jnp.where(hit, z, 0.0), axis=-1)
            if with_topk:
                local, inside = _topk_in_block(ids_c, start, i * block_v, block_v)
                zk = zk + jnp.where(inside, jnp.take_along_axis(z, local, axis=-1), 0.0)
            return m_new, l, s1, zt, zk

        zeros = jnp.zeros((block_n,), jnp.float32)
        zk = jnp.zeros(ids_c.shape, jnp.float32) if with_topk else zeros
        init = (jnp.full((block_n,), -jnp.inf, jnp.float32), zeros, zeros, zeros, zk)
        m, l, s1, zt, zk = jax.lax.fori_loop(0, -(-vocab // block_v), step, init)
        lse = m + jnp.log(l)
        return lse, zt - lse, lse - s1 / l, zk

    lse, logp, entropy, zk = jax.lax.map(chunk_stats, jnp.arange(chunks))
    flat = lambda x: x.reshape(padded, *x.shape[2:])[:n]
    lse, logp, entropy = flat(lse), flat(logp), flat(entropy)
    log_q = kl = None
    if with_topk:
        log_q = jax.nn.log_softmax(flat(zk), axis=-1)  # policy renormalised on the reference's top-K
        kl = jnp.sum(jnp.exp(log_q) * (log_q - ref_logp), axis=-1)
    return (logp, entropy, kl), (lse, log_q)


def _backward(hidden, unembedding, targets, ref_ids, ref_logp, lse, log_q, entropy, kl,
              g_logp, g_entropy, g_kl, temperature, block_n, block_v):
    """(dhidden [N, D], dW [D, V]) for cotangents g_* [N] (g_entropy / g_kl may be None)."""
    n, vocab = hidden.shape[0], unembedding.shape[1]
    block_n, block_v = min(block_n, n), min(block_v, vocab)
    chunks = -(-n // block_n)
    padded = chunks * block_n
    # Padded rows get zero cotangents, so they add nothing to dW.
    pad = functools.partial(_pad_rows, rows=padded)
    h, t, lse, g_logp = pad(hidden), pad(targets), pad(lse), pad(g_logp)
    # d entropy / d z_j = -p_j (log p_j + H): kept as the per-token pieces g_H and g_H * H.
    g_ent = None if g_entropy is None else (pad(g_entropy), pad(g_entropy * entropy))
    # d KL / d z_k = q_k (log q_k - log r_k - KL) on the top-K support, zero elsewhere.
    kl_coef = None
    if g_kl is not None:
        kl_coef = pad(g_kl[:, None] * jnp.exp(log_q) * (log_q - ref_logp - kl[:, None]))
        ids = pad(ref_ids)

    def rows(x, c):
        return jax.lax.dynamic_slice_in_dim(x, c * block_n, block_n, axis=0)

    def vocab_step(i, carry):
        dh, dw = carry
        w, start, fresh = _vocab_block(unembedding, i, block_v)
        cols = start + jnp.arange(block_v)

        def chunk_step(c, carry):
            dh, dw_block = carry
            h_c = _loop_slice(h, c * block_n, block_n, 0, c)
            z = _logits(h_c, w, temperature)
            log_p = z - rows(lse, c)[:, None]
            p = jnp.exp(log_p)
            dz = rows(g_logp, c)[:, None] * ((cols == rows(t, c)[:, None]) - p)
            if g_ent is not None:
                dz = dz - p * (rows(g_ent[0], c)[:, None] * log_p + rows(g_ent[1], c)[:, None])
            if kl_coef is not None:
                local, inside = _topk_in_block(rows(ids, c), start, i * block_v, block_v)
                row_index = jnp.broadcast_to(jnp.arange(block_n)[:, None], local.shape)
                dz = dz.at[row_index, local].add(jnp.where(inside, rows(kl_coef, c), 0.0))
            dz = jnp.where(fresh, dz, 0.0) / temperature
            dh_c = jnp.dot(dz.astype(h_c.dtype), w.astype(h_c.dtype).T, preferred_element_type=jnp.float32)
            dh = jax.lax.dynamic_update_slice_in_dim(dh, rows(dh, c) + dh_c, c * block_n, axis=0)
            dw_block = dw_block + jnp.dot(h_c.T, dz.astype(h_c.dtype), preferred_element_type=jnp.float32)
            return dh, dw_block

        dw_block = jnp.zeros((hidden.shape[1], block_v), jnp.float32)
        dh, dw_block = jax.lax.fori_loop(0, chunks, chunk_step, (dh, dw_block))
        old = jax.lax.dynamic_slice_in_dim(dw, start, block_v, axis=1)
        dw = jax.lax.dynamic_update_slice_in_dim(dw, jnp.where(fresh, dw_block.astype(dw.dtype), old), start, axis=1)
        return dh, dw

    init = (jnp.zeros((padded, hidden.shape[1]), jnp.float32), jnp.zeros_like(unembedding))
    dh, dw = jax.lax.fori_loop(0, -(-vocab // block_v), vocab_step, init)
    return dh[:n].astype(hidden.dtype), dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _fused(hidden, unembedding, targets, ref_ids, ref_logp, temperature, with_entropy, block_n, block_v):
    (logp, entropy, kl), _ = _forward(hidden, unembedding, targets, ref_ids, ref_logp, temperature, block_n, block_v)
    return logp, entropy if with_entropy else None, kl


def _fused_fwd(hidden, unembedding, targets, ref_ids, ref_logp, temperature, with_entropy, block_n, block_v):
    (logp, entropy, kl), (lse, log_q) = _forward(hidden, unembedding, targets, ref_ids, ref_logp,
                                                  temperature, block_n, block_v)
    out = (logp, entropy if with_entropy else None, kl)
    return out, (hidden, unembedding, targets, ref_ids, ref_logp, lse, log_q, entropy, kl)


def _fused_bwd(temperature, with_entropy, block_n, block_v, residuals, cotangents):
    hidden, unembedding, targets, ref_ids, ref_logp, lse, log_q, entropy, kl = residuals
    g_logp, g_entropy, g_kl = cotangents
    dh, dw = _backward(hidden, unembedding, targets, ref_ids, ref_logp, lse, log_q, entropy, kl,
                       g_logp, g_entropy, g_kl, temperature, block_n, block_v)
    # Reference top-K log-probs are data (a frozen model's output): no gradient flows to them.
    return dh, dw, None, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def logprob_kl(hidden, unembedding, targets, ref_topk_ids=None, ref_topk_logprobs=None, *,
               temperature: float = 1.0, with_entropy: bool = False,
               block_n: int = DEFAULT_BLOCK_N, block_v: int = DEFAULT_BLOCK_V) -> LogprobKL:
    """Same contract as `reference.logprob_kl`; any N and V (blocks are clamped, not padded, over V)."""
    return LogprobKL(*_fused(hidden, unembedding, targets, ref_topk_ids, ref_topk_logprobs,
                             float(temperature), bool(with_entropy), int(block_n), int(block_v)))
