"""What the Pallas log-prob kernels share: per-block math and the custom-VJP wrapper.

A kernel backend supplies, on arrays padded to its block sizes:
  forward(hidden [Np, D], w [D, Vp], targets [Np]) -> (lse, logp, entropy) [Np] float32
  backward(hidden, w, targets, lse, g_logp, g_ent, g_ent_h) -> (dhidden [Np, D], dW [D, Vp])
where g_ent_h = g_entropy * entropy. Padded vocabulary columns are masked by `vocab`.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from kernels.logprob_kl.reference import LogprobKL


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


def dlogits(z, cols, targets, vocab, lse, g_logp, g_ent, g_ent_h, temperature):
    """Gradient w.r.t. (h @ w) of one block: [bn, bv] float32, temperature included, padding zeroed.

    d logp / dz_j = [j = target] - p_j;  d entropy / dz_j = -p_j (log p_j + H).
    """
    log_p = z - lse
    p = jnp.exp(log_p)
    dz = g_logp * ((cols == targets).astype(jnp.float32) - p) - p * (g_ent * log_p + g_ent_h)
    return jnp.where(cols < vocab, dz, 0.0) / temperature


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def make_logprob(forward: Callable, backward: Callable, block_n: int, block_v: int) -> Callable:
    """fn(hidden [N, D], unembedding [D, V], targets [N], *, with_entropy) -> LogprobKL (kl None)."""

    @jax.custom_vjp
    def core(hidden, w, targets):
        return forward(hidden, w, targets)[1:]

    def core_fwd(hidden, w, targets):
        lse, logp, entropy = forward(hidden, w, targets)
        return (logp, entropy), (hidden, w, targets, lse, entropy)

    def core_bwd(residuals, cotangents):
        hidden, w, targets, lse, entropy = residuals
        g_logp, g_ent = cotangents
        dh, dw = backward(hidden, w, targets, lse, g_logp, g_ent, g_ent * entropy)
        return dh, dw, None

    core.defvjp(core_fwd, core_bwd)

    def fn(hidden, unembedding, targets, *, with_entropy=False):
        n, vocab = hidden.shape[0], unembedding.shape[1]
        rows, cols = _round_up(n, block_n), _round_up(vocab, block_v)
        # Padded rows are sliced off (zero cotangent); padded columns are masked inside the kernels.
        h = jnp.pad(hidden, [(0, rows - n), (0, 0)])
        w = jnp.pad(unembedding, [(0, 0), (0, cols - vocab)])
        logp, entropy = core(h, w, jnp.pad(targets, (0, rows - n)))
        return LogprobKL(logp[:n], entropy[:n] if with_entropy else None, None)

    return fn


def check_no_topk(name, ref_topk_ids):
    if ref_topk_ids is not None:
        raise ValueError(f"{name}: the Pallas kernel computes log-probs and entropy only; the top-K KL runs "
                         "on the 'xla' implementation (kernels.logprob_kl.api routes it there)")
