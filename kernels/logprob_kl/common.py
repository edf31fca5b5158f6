"""What the Pallas log-prob kernels share: per-block math and the custom-VJP wrapper.

A kernel backend supplies, on arrays padded to its block sizes:
  forward(hidden [Np, D], w [D, Vp], targets [Np], ids [Np, Kp] | None)
    -> (lse, logp, entropy) [Np] float32 and z_topk [Np, Kp] float32 | None
  backward(hidden, w, targets, lse, g_logp, g_ent, g_ent_h, ids | None, kl_coef [Np, Kp] | None)
    -> (dhidden [Np, D], dW [D, Vp])
where g_ent_h = g_entropy * entropy, z_topk are the logits / temperature at the reference's top-K ids
(picked up as their vocabulary block passes, like the target logit) and kl_coef is d loss / d z_topk.
Padded vocabulary columns are masked by `vocab`; padded top-K slots hold id -1, which no column matches.

The top-K KL itself is [N, K] math done here, outside the kernels, exactly as `xla.py` does it. Its
memory beyond the log-prob kernels: ids, z_topk and kl_coef [N, Kp] (Kp = K rounded up to a power of
two); no [N, K, D] gather of unembedding columns and no [N, V] array. Its compute: per vocabulary block
and top-K slot, one compare-select-reduce over the [block_n, block_v] logits (K such passes besides the
D-deep matmul).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from alignment_kernels.logprob_kl.reference import LogprobKL


def logits(h, w, temperature):
    return jnp.dot(h, w.astype(h.dtype), preferred_element_type=jnp.float32) / temperature


def stats_step(carry, z, cols, targets, vocab):
    """Online log-sum-exp over one vocabulary block.

    carry (m, l, s1, zt) [bn, 1]: running max, sum of exp(z - m), sum of exp(z - m) * z (entropy),
    target logit. z [bn, bv] float32; cols [1, bv] global column ids; targets [bn, 1].
    """
    m, l, s1, zt = carry
    valid = cols < vocab
    z = jnp.where(valid, z, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(z, axis=-1, keepdims=True))  # finite: every block has a valid column
    e = jnp.exp(z - m_new)
    correction = jnp.exp(m - m_new)
    l = l * correction + jnp.sum(e, axis=-1, keepdims=True)
    s1 = s1 * correction + jnp.sum(e * jnp.where(valid, z, 0.0), axis=-1, keepdims=True)
    zt = zt + jnp.sum(jnp.where(cols == targets, z, 0.0), axis=-1, keepdims=True)
    return m_new, l, s1, zt


def stats_init(rows):
    zeros = jnp.zeros((rows, 1), jnp.float32)
    return jnp.full((rows, 1), -jnp.inf, jnp.float32), zeros, zeros, zeros


def stats_finish(m, l, s1, zt):
    """(lse, logp, entropy) [bn, 1]."""
    lse = m + jnp.log(l)
    return lse, zt - lse, lse - s1 / l


def _slot(x, k):
    """x[:, k:k+1] of x [bn, Kp] for a traced k, as a masked lane sum: neither Triton nor Mosaic slices
    registers at a dynamic lane offset."""
    slots = jax.lax.broadcasted_iota(jnp.int32, (1, x.shape[1]), 1)
    return jnp.sum(jnp.where(slots == k, x, jnp.zeros((), x.dtype)), axis=-1, keepdims=True)


def topk_pick(z_topk, z, cols, ids, topk):
    """z_topk [bn, Kp] plus the block's logits z [bn, bv] (columns cols [1, bv]) at ids [bn, Kp], for the
    first `topk` slots. An id outside the block adds 0, so summing over all blocks picks each logit once."""
    slots = jax.lax.broadcasted_iota(jnp.int32, (1, ids.shape[1]), 1)

    def body(k, acc):
        z_k = jnp.sum(jnp.where(cols == _slot(ids, k), z, 0.0), axis=-1, keepdims=True)
        return acc + jnp.where(slots == k, z_k, 0.0)

    return jax.lax.fori_loop(0, topk, body, z_topk)


def topk_dlogits(cols, ids, kl_coef, topk):
    """kl_coef [bn, Kp] scattered onto the block's columns cols [1, bv] at ids [bn, Kp] -> [bn, bv]."""
    def body(k, dz):
        return dz + jnp.where(cols == _slot(ids, k), _slot(kl_coef, k), 0.0)

    return jax.lax.fori_loop(0, topk, body, jnp.zeros((ids.shape[0], cols.shape[1]), jnp.float32))


def dlogits(z, cols, targets, vocab, lse, g_logp, g_ent, g_ent_h, temperature, kl_grad=None):
    """Gradient w.r.t. (h @ w) of one block: [bn, bv] float32, temperature included, padding zeroed.

    d logp / dz_j = [j = target] - p_j;  d entropy / dz_j = -p_j (log p_j + H);
    kl_grad (ids, kl_coef, topk): d KL / dz at the top-K ids, added where they fall in this block.
    """
    log_p = z - lse
    p = jnp.exp(log_p)
    dz = g_logp * ((cols == targets).astype(jnp.float32) - p) - p * (g_ent * log_p + g_ent_h)
    if kl_grad is not None:
        dz = dz + topk_dlogits(cols, *kl_grad)
    return jnp.where(cols < vocab, dz, 0.0) / temperature


def topk_width(k: int) -> int:
    """Kp: K rounded up to a power of two (Triton block shapes must be one; on TPU it is the full dim)."""
    return 1 << (k - 1).bit_length()


def topk_kl(z_topk, ref_logp):
    """(log q [N, K], KL [N]): the policy renormalised on the reference's top-K, KL(q || reference)."""
    log_q = jax.nn.log_softmax(z_topk, axis=-1)
    return log_q, jnp.sum(jnp.exp(log_q) * (log_q - ref_logp), axis=-1)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def make_logprob(forward: Callable, backward: Callable, block_n: int, block_v: int) -> Callable:
    """fn(hidden [N, D], unembedding [D, V], targets [N], ref_ids [N, K] | None, ref_logp [N, K] | None,
    *, with_entropy) -> LogprobKL, the contract of `reference.logprob_kl`."""

    def core_fwd(hidden, w, targets, ids, ref_logp):
        lse, logp, entropy, z_topk = forward(hidden, w, targets, ids)
        log_q = kl = None
        if ids is not None:
            log_q, kl = topk_kl(z_topk[:, :ref_logp.shape[1]], ref_logp)
        return (logp, entropy, kl), (hidden, w, targets, ids, ref_logp, lse, entropy, log_q, kl)

    @jax.custom_vjp
    def core(hidden, w, targets, ids, ref_logp):
        return core_fwd(hidden, w, targets, ids, ref_logp)[0]

    def core_bwd(residuals, cotangents):
        hidden, w, targets, ids, ref_logp, lse, entropy, log_q, kl = residuals
        g_logp, g_ent, g_kl = cotangents
        kl_coef = None
        if ids is not None:
            # d KL / d z_k = q_k (log q_k - log r_k - KL) on the top-K support, as in xla.py.
            kl_coef = g_kl[:, None] * jnp.exp(log_q) * (log_q - ref_logp - kl[:, None])
            kl_coef = jnp.pad(kl_coef, [(0, 0), (0, ids.shape[1] - kl_coef.shape[1])])
        dh, dw = backward(hidden, w, targets, lse, g_logp, g_ent, g_ent * entropy, ids, kl_coef)
        # Reference top-K log-probs are data (a frozen model's output): no gradient flows to them (as xla.py).
        return dh, dw, None, None, None

    core.defvjp(core_fwd, core_bwd)

    def fn(hidden, unembedding, targets, ref_ids=None, ref_logp=None, *, with_entropy=False):
        n, vocab = hidden.shape[0], unembedding.shape[1]
        rows, cols = _round_up(n, block_n), _round_up(vocab, block_v)
        # Padded rows are sliced off (zero cotangent); padded columns are masked inside the kernels.
        pad_rows = lambda x: jnp.pad(x, [(0, rows - n)] + [(0, 0)] * (x.ndim - 1))
        h = pad_rows(hidden)
        w = jnp.pad(unembedding, [(0, 0), (0, cols - vocab)])
        ids = lp = None
        if ref_ids is not None:
            k = ref_ids.shape[1]
            ids = jnp.pad(ref_ids.astype(jnp.int32), [(0, rows - n), (0, topk_width(k) - k)], constant_values=-1)
            lp = pad_rows(ref_logp.astype(jnp.float32))
        logp, entropy, kl = core(h, w, pad_rows(targets), ids, lp)
        return LogprobKL(logp[:n], entropy[:n] if with_entropy else None, None if kl is None else kl[:n])

    return fn
