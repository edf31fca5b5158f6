"""The oracle: materialises [tokens, vocab] logits, all math in float32 (or float64 under x64).

Inputs: hidden [N, D], unembedding [D, V], targets [N] int, temperature; optionally the reference
model's top-K token ids [N, K] and their log-probs renormalised over those K.
Outputs per token: log p(target) under the full-vocabulary softmax of logits / temperature, the
entropy of that softmax, and KL(policy || reference) restricted to the reference's top-K tokens with
the policy renormalised on that support too (the Baichuan Alignment paper's exact top-K KL).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class LogprobKL(NamedTuple):
    logp: jax.Array  # [N] float32: log p(target)
    entropy: jax.Array | None  # [N] float32, when requested
    kl: jax.Array | None  # [N] float32 >= 0: top-K KL(policy || reference), when reference top-K is given


def topk_kl(policy_topk_logits, ref_topk_logprobs):
    """[N, K] policy logits at the reference's top-K ids, [N, K] renormalised reference log-probs -> [N]."""
    log_q = jax.nn.log_softmax(policy_topk_logits, axis=-1)
    return jnp.sum(jnp.exp(log_q) * (log_q - ref_topk_logprobs), axis=-1)


def logprob_kl(hidden, unembedding, targets, ref_topk_ids=None, ref_topk_logprobs=None, *,
               temperature: float = 1.0, with_entropy: bool = False) -> LogprobKL:
    dtype = jnp.promote_types(jnp.float32, hidden.dtype)
    logits = jnp.dot(hidden.astype(dtype), unembedding.astype(dtype), precision="highest") / temperature
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(log_probs, targets[:, None], axis=-1)[:, 0]
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1) if with_entropy else None
    kl = None
    if ref_topk_ids is not None:
        kl = topk_kl(jnp.take_along_axis(logits, ref_topk_ids, axis=-1), ref_topk_logprobs)
    return LogprobKL(logp, entropy, kl)


def k3(logp, ref_logp):
    """The k3 estimator of KL(policy || reference) from per-token log-probs of the sampled tokens [N]:
    exp(r - p) - (r - p) - 1, unbiased in expectation over samples and always >= 0. Written with expm1 so
    small log-ratios keep their digits in float32."""
    log_ratio = ref_logp - logp
    return jnp.expm1(log_ratio) - log_ratio
