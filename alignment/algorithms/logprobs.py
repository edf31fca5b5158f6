"""Per-token log-probabilities, entropies and KL terms from hidden states and the output head.

Everything goes through the fused kernel (`kernels/logprob_kl`), which streams vocabulary blocks and
never builds [batch, seq, vocab] logits, in the forward or the backward pass. Under an
activation-sharding mesh the kernel runs per device on its rows (shard_map); the output head is
gathered once and its gradient summed over the devices.
"""
from __future__ import annotations

import jax
from jax.sharding import PartitionSpec

from alignment import sharding
from kernels.logprob_kl import api as kernel_api
from kernels.logprob_kl.reference import LogprobKL, k3  # noqa: F401  (k3 re-exported for GRPO)


def _rows_spec(rules) -> PartitionSpec:
    """Mesh axes of the flattened [batch * seq] token axis (batch-major)."""
    axes = []
    for name in ("batch", "seq"):
        rule = rules[name]
        axes += [] if rule is None else [rule] if isinstance(rule, str) else list(rule)
    return PartitionSpec(tuple(axes) or None)


def _per_device(fn, hidden, unembedding, *row_arrays):
    """fn(hidden [N, D], unembedding, *row_arrays [N, ...]) -> LogprobKL, run per device on its rows."""
    context = sharding.current_activation_sharding()
    if context is None:
        return fn(hidden, unembedding, *row_arrays)
    mesh, rules = context
    rows = _rows_spec(rules)
    in_specs = (rows, PartitionSpec(), *(None if a is None else rows for a in row_arrays))
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=rows, check_vma=False)(hidden, unembedding, *row_arrays)


def logprobs_entropy_kl(hidden: jax.Array, unembedding: jax.Array, targets: jax.Array, *,
                        temperature: float = 1.0, ref_topk_ids: jax.Array | None = None,
                        ref_topk_logprobs: jax.Array | None = None, with_entropy: bool = False,
                        impl: str | None = None) -> LogprobKL:
    """hidden [batch, seq, d], unembedding [d, vocab], targets [batch, seq];
    ref_topk_ids / ref_topk_logprobs [batch, seq, K] (the reference's top-K ids and their log-probs
    renormalised over those K).

    Returns LogprobKL with [batch, seq] float32 fields: logp of the targets under the full softmax of
    logits / temperature, entropy (when `with_entropy`), and the exact top-K KL(policy || reference)
    (when the top-K is given). Use `k3(logp, ref_logp)` for the sampled-token estimator instead.
    """
    batch, seq, d = hidden.shape
    flat = lambda x: None if x is None else x.reshape(batch * seq, *x.shape[2:])

    def run(h, w, t, ids, ref_lp):
        return kernel_api.logprob_kl(h, w, t, ids, ref_lp, temperature=temperature,
                                     with_entropy=with_entropy, impl=impl)

    out = _per_device(run, flat(hidden), unembedding, flat(targets), flat(ref_topk_ids), flat(ref_topk_logprobs))
    return LogprobKL(*(None if x is None else x.reshape(batch, seq) for x in out))


def token_logprobs(hidden: jax.Array, unembedding: jax.Array, targets: jax.Array,
                   temperature: float = 1.0, *, impl: str | None = None) -> jax.Array:
    """hidden [batch, seq, d], unembedding [d, vocab], targets [batch, seq] -> log p(target) [batch, seq] float32."""
    return logprobs_entropy_kl(hidden, unembedding, targets, temperature=temperature, impl=impl).logp
