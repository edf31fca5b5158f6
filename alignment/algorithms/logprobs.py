"""Per-token log-probabilities, entropies and KL terms from hidden states and the output head.

Everything goes through the fused kernel (`kernels/logprob_kl`), which streams vocabulary blocks and
never builds [batch, seq, vocab] logits, in the forward or the backward pass. Under an
activation-sharding mesh the kernel runs per device on its rows (shard_map); the output head is
gathered once and its gradient summed over the devices.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from alignment import sharding
from alignment.models.transformer import Transformer, init_cache, repeat_cache_rows
from alignment_kernels.logprob_kl import api as kernel_api
from alignment_kernels.logprob_kl.reference import LogprobKL, k3  # noqa: F401  (k3 re-exported for GRPO)


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


def target_hidden(model, params, batch: dict, group: int = 1) -> jax.Array:
    """Final hidden states [rows, C, d] of the input columns that predict batch["targets"] [rows, C]: the last
    C columns of batch["inputs"] [rows, W] (C = W for whole rows; the completion window of
    `data.rl_rows.completion_rows`, so the output head runs on completion tokens only).

    group > 1: rows come in runs of `group` that share their first P = W - C + 1 columns (a prompt and its
    samples, in `completion_rows` order). Each prompt then runs once into a KV cache that its samples attend
    to, instead of once per sample: the same attention and values, about 40% fewer FLOPs for GRPO's groups.
    """
    new = batch["targets"].shape[1]
    if group == 1:
        hidden = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
        return hidden[:, hidden.shape[1] - new:]
    rows, width = batch["inputs"].shape
    prompt = width - new + 1
    decode = lambda cache, key, index: model.apply(
        {"params": params}, batch["inputs"][key], batch["positions"][key], batch["segment_ids"][key], cache,
        index, method=Transformer.decode)
    cache = init_cache(model.config, rows // group, width)
    prompt_hidden, cache = decode(cache, (slice(None, None, group), slice(None, prompt)), 0)
    cache = repeat_cache_rows(cache, group)
    sample_hidden, _ = decode(cache, (slice(None), slice(prompt, None)), prompt)
    # The prompt's last column predicts every sample's first token.
    return jnp.concatenate([jnp.repeat(prompt_hidden[:, -1:], group, axis=0), sample_hidden], axis=1)


def token_logprobs(hidden: jax.Array, unembedding: jax.Array, targets: jax.Array,
                   temperature: float = 1.0, *, impl: str | None = None) -> jax.Array:
    """hidden [batch, seq, d], unembedding [d, vocab], targets [batch, seq] -> log p(target) [batch, seq] float32."""
    return logprobs_entropy_kl(hidden, unembedding, targets, temperature=temperature, impl=impl).logp
