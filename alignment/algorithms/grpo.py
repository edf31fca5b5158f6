"""GRPO as the Baichuan report runs it, as pure functions over [rows, tokens] arrays.

Rows are completions: row p * G + g is sample g of prompt p. Token arrays are [rows, tokens] over
the completion tokens, with `mask` marking real ones.

Advantages (`group_advantages`): rewards normalised within each prompt's group of G samples.
KL to the reference policy, two modes (`config.kl_mode`):
  * "token_reward" (the paper's): KL_t = exact KL(policy || reference) over the reference's top-K tokens
    (both renormalised there, so >= 0) enters a token-level reward r_t = -beta * KL_t, the sequence
    advantage is added at the last token, and each token's advantage is the reward-to-go;
  * "k3" (DeepSeekMath): beta * k3(logp, ref_logp) is added to the per-token loss, optionally weighted by the
    importance ratio exp(logp - old_logp) (`kl_penalty`; TRL's default `use_bias_correction_kl`).
Loss: the PPO-clip surrogate with separate low/high clip ranges, aggregated over the global batch by
one of AGGREGATIONS through (sum, count) pairs, so micro-batches and hosts give the exact global mean.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from alignment.algorithms.logprobs import k3, logprobs_entropy_kl, target_hidden

ADVANTAGE_SCALES = ("group", "batch", "none")
ESTIMATORS = ("grpo", "rloo")
KL_MODES = ("token_reward", "k3", "none")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "constant")


def group_advantages(rewards: jax.Array, scale: str = "group", estimator: str = "grpo",
                     eps: float = 1e-6) -> jax.Array:
    """rewards [prompts, G] -> advantages [prompts, G].

    grpo: r - mean(group); rloo: r - mean(other samples of the group). `scale` divides by the std of the
    group, of the whole batch, or nothing. A group whose rewards are all equal carries no preference
    signal: its advantages are exactly 0 (the std division cannot blow up, thanks to eps).
    """
    if scale not in ADVANTAGE_SCALES or estimator not in ESTIMATORS:
        raise ValueError(f"advantages: scale in {ADVANTAGE_SCALES} and estimator in {ESTIMATORS}, "
                         f"got {scale!r}, {estimator!r}")
    g = rewards.shape[1]
    mean = rewards.mean(axis=1, keepdims=True)
    if estimator == "grpo":
        centred = rewards - mean
    else:
        if g < 2:
            raise ValueError("rloo needs at least 2 samples per prompt")
        centred = (rewards - mean) * g / (g - 1)  # r_i - mean of the other g - 1 samples
    if scale == "group":
        return centred / (rewards.std(axis=1, keepdims=True) + eps)
    if scale == "batch":
        return centred / (rewards.std() + eps)
    return centred


def token_advantages(seq_advantages: jax.Array, kl: jax.Array, mask: jax.Array, beta: float) -> jax.Array:
    """The paper's token-level decomposition: rewards r_t = -beta * KL_t on every completion token, plus
    the sequence advantage at the last one; each token's advantage is its reward-to-go (no discount).

    seq_advantages [rows], kl and mask [rows, tokens] -> advantages [rows, tokens] (0 off the mask).
    """
    mask = mask.astype(jnp.float32)
    rewards = -beta * kl * mask
    # Reward-to-go of the KL part: reverse cumulative sum along tokens.
    kl_to_go = jnp.flip(jnp.cumsum(jnp.flip(rewards, axis=1), axis=1), axis=1)
    # The sequence advantage sits at the last token, so every earlier token sees it in its reward-to-go.
    return (kl_to_go + seq_advantages[:, None]) * mask


def clipped_surrogate(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, clip_low: float,
                      clip_high: float) -> tuple[jax.Array, jax.Array]:
    """Per-token PPO-clip loss -min(ratio A, clip(ratio, 1 - low, 1 + high) A) and whether it clipped."""
    ratio = jnp.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    return -jnp.minimum(unclipped, clipped), (clipped < unclipped).astype(jnp.float32)


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, old_logp: jax.Array, importance_ratio: bool) -> jax.Array:
    """Per-token KL term of the k3 mode [rows, tokens]: k3(logp, ref_logp), times exp(logp - old_logp) (with its
    gradient) when `importance_ratio` is set. k3 estimates KL(policy || reference) on tokens drawn from the
    policy; the ratio corrects for their having been drawn from the rollout (old) policy."""
    kl = k3(logp, ref_logp)
    return kl * jnp.exp(logp - old_logp) if importance_ratio else kl


def kl_form(importance_ratio: bool) -> str:
    """The k3 mode's KL term as metrics name it: "k3", or "k3_ratio" when weighted by the importance ratio."""
    return "k3_ratio" if importance_ratio else "k3"


def aggregate(per_token: jax.Array, mask: jax.Array, aggregation: str, max_tokens: int) -> tuple[jax.Array, jax.Array]:
    """(sum, count) whose global ratio is the aggregated loss.

    token_mean: all completion tokens of the global batch weigh the same;
    seq_mean_token_mean: each sequence's token mean, averaged over sequences;
    constant: sum over tokens / (sequences * max_tokens), Dr. GRPO's length-unbiased normaliser.
    """
    mask = mask.astype(jnp.float32)
    rows = (mask.sum(axis=1) > 0).astype(jnp.float32)
    if aggregation == "token_mean":
        return jnp.sum(per_token * mask), jnp.sum(mask)
    if aggregation == "seq_mean_token_mean":
        lengths = jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)
        return jnp.sum(per_token * mask / lengths), jnp.sum(rows)
    if aggregation == "constant":
        return jnp.sum(per_token * mask), jnp.sum(rows) * max_tokens
    raise ValueError(f"loss aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def reference_topk(hidden: jax.Array, unembedding: jax.Array, k: int, temperature: float = 1.0,
                   chunk: int = 256) -> tuple[jax.Array, jax.Array]:
    """The reference's top-K token ids [b, s, K] and their log-probs renormalised over those K.

    Computed over `chunk` tokens at a time so only [chunk, vocab] logits exist at once.
    """
    batch, seq, d = hidden.shape
    flat = hidden.reshape(batch * seq, d)
    pad = -flat.shape[0] % chunk
    flat = jnp.pad(flat, ((0, pad), (0, 0))).reshape(-1, chunk, d)

    def one(h):
        logits = jnp.einsum("nd,dv->nv", h, unembedding.astype(h.dtype), preferred_element_type=jnp.float32)
        values, ids = jax.lax.top_k(logits / temperature, k)
        return ids, jax.nn.log_softmax(values, axis=-1)

    ids, logprobs = jax.lax.map(one, flat)
    ids = ids.reshape(-1, k)[: batch * seq].reshape(batch, seq, k)
    return ids, logprobs.reshape(-1, k)[: batch * seq].reshape(batch, seq, k)


def grpo_loss(model, params, batch: dict, rng: jax.Array, *, temperature: float, clip_low: float,
              clip_high: float, kl_mode: str, beta: float, aggregation: str, max_tokens: int, group: int = 1,
              kl_importance_ratio: bool = False):
    """The policy update loss on a rollout batch: inputs, positions, segment_ids [rows, W]; targets, loss_mask
    (completion tokens), advantages, old_logp (from the rollout policy), ref_logp (k3 mode) [rows, C], over
    the last C input columns (`logprobs.target_hidden`); first_pass [rows] (1.0 where the parameters are still
    the rollout's, so old_logp is taken as this pass's own log-prob and the ratio is exactly 1). group > 1:
    rows come in runs of that many samples of one prompt, which then runs once (`logprobs.target_hidden`).
    kl_importance_ratio (k3 mode only): the KL term is k3 times the ratio (`kl_penalty`).

    Metrics also hold the policy's entropy summed over the completion tokens (`entropy_sum`), so a step that
    skips the separate scoring pass of the policy still reports it, and in k3 mode the KL term summed over them,
    named by its form (`kl_form`): `k3_sum`, or `k3_ratio_sum` with the importance ratio.
    """
    del rng
    if kl_importance_ratio and kl_mode != "k3":
        raise ValueError(f"kl_importance_ratio weights the k3 KL term: it needs kl_mode 'k3', got {kl_mode!r}")
    hidden = target_hidden(model, params, batch, group)
    unembedding = model.apply({"params": params}, method="unembedding")
    scored = logprobs_entropy_kl(hidden, unembedding, batch["targets"], temperature=temperature,
                                 with_entropy=True, impl=model.config.logprob_impl or None)
    logp = scored.logp
    first = batch["first_pass"][:, None] > 0
    old_logp = jnp.where(first, jax.lax.stop_gradient(logp), batch["old_logp"])
    per_token, clipped = clipped_surrogate(logp, old_logp, batch["advantages"], clip_low, clip_high)
    mask = batch["loss_mask"].astype(jnp.float32)
    metrics = {
        "clip_fraction_sum": jnp.sum(clipped * mask),
        "ratio_sum": jnp.sum(jnp.exp(logp - old_logp) * mask),
        "tokens": jnp.sum(mask),
        "entropy_sum": jnp.sum(jax.lax.stop_gradient(scored.entropy) * mask),
    }
    if kl_mode == "k3":
        kl = kl_penalty(logp, batch["ref_logp"], old_logp, kl_importance_ratio)
        per_token = per_token + beta * kl
        metrics[f"{kl_form(kl_importance_ratio)}_sum"] = jnp.sum(kl * mask)
    loss_sum, count = aggregate(per_token, mask, aggregation, max_tokens)
    return loss_sum, (count, metrics)


def ptx_kl_loss(model, params, batch: dict, rng: jax.Array, *, gamma: float):
    """The paper's replacement for PTX: gamma * KL(policy || reference) over the reference's top-K on SFT
    tokens, a penalty that keeps the policy near the reference on SFT data (not a cross-entropy term).

    batch: SFT rows (inputs, targets, positions, segment_ids, loss_mask) plus ref_topk_ids / ref_topk_logprobs
    [rows, tokens, K].
    """
    del rng
    hidden = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
    unembedding = model.apply({"params": params}, method="unembedding")
    kl = logprobs_entropy_kl(hidden, unembedding, batch["targets"], ref_topk_ids=batch["ref_topk_ids"],
                             ref_topk_logprobs=batch["ref_topk_logprobs"]).kl
    mask = batch["loss_mask"].astype(jnp.float32)
    return gamma * jnp.sum(kl * mask), (jnp.sum(mask), {"tokens": jnp.sum(mask), "ptx_kl_sum": jnp.sum(kl * mask)})
