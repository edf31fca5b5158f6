"""Per-token log-probabilities of target ids under the model's output head."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(hidden: jax.Array, unembedding: jax.Array, targets: jax.Array,
                   temperature: float = 1.0) -> jax.Array:
    """hidden [batch, seq, d], unembedding [d, vocab], targets [batch, seq] -> log p(target) [batch, seq] float32.

    This path materialises [batch, seq, vocab] logits; the fused kernel in `kernels/logprob_kl` streams
    vocabulary blocks instead.
    """
    logits = jnp.einsum("bsd,dv->bsv", hidden, unembedding.astype(hidden.dtype),
                        preferred_element_type=jnp.float32) / temperature
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target_logits - jax.nn.logsumexp(logits, axis=-1)
