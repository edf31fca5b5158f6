"""GRPO as the Baichuan report runs it, as pure functions over [rows, tokens] arrays.

Rows are completions: row p * G + g is sample g of prompt p. Token arrays are [rows, tokens] over
the completion tokens, with `mask` marking real ones.

Advantages (`group_advantages`): rewards normalised within each prompt's group of G samples.
KL to the reference policy, two modes (`config.kl_mode`):
  * "token_reward" (the paper's): KL_t = exact KL(policy || reference) over the reference's top-K tokens
    (both renormalised there, so >= 0) enters a token-level reward r_t = -beta * KL_t, the sequence
    advantage is added at the last token, and each token's advantage is the reward-to-go;
  * "k3" (DeepSeekMath): beta * k3(logp, ref_logp) is added to the per-token loss, optionally weighted by the
    policy loss's importance ratio (`kl_penalty`; TRL's default `use_bias_correction_kl`).
Policy loss, by name (`POLICY_LOSSES`, `policy_loss`): the PPO-clip surrogate with separate low/high clip
ranges (the paper's; DAPO's clip-higher), GSPO (one clipped ratio per sequence) or CISPO (a clipped, detached
importance weight on the log-prob); tokens sampled by another policy are weighted by `off_policy`'s importance
correction. Aggregated over the global batch by one of AGGREGATIONS through (sum, count) pairs, so micro-batches
and hosts give the exact global mean.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from alignment.algorithms.logprobs import k3, logprobs_entropy_kl, target_hidden
from alignment.algorithms.off_policy import ISCorrection, importance_weights, mismatch_sums

ADVANTAGE_SCALES = ("group", "batch", "none")
ESTIMATORS = ("grpo", "rloo")
KL_MODES = ("token_reward", "k3", "none")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "constant")
POLICY_LOSSES = ("ppo_clip", "gspo", "cispo")


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
    return _clipped(jnp.exp(logp - old_logp), advantages, clip_low, clip_high)


def _clipped(ratio: jax.Array, advantages: jax.Array, clip_low: float, clip_high: float) -> tuple[jax.Array, jax.Array]:
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    return -jnp.minimum(unclipped, clipped), (clipped < unclipped).astype(jnp.float32)


def importance_ratio(policy: str, logp: jax.Array, old_logp: jax.Array, mask: jax.Array) -> jax.Array:
    """pi / pi_old as policy loss `policy` takes it: each token's exp(logp - old_logp) [rows, tokens], or for gspo
    each sequence's exp(mean over its tokens of logp - old_logp) [rows, 1], the gradient flowing through the mean."""
    if policy == "gspo":
        mask = mask.astype(jnp.float32)
        lengths = jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0)
        return jnp.exp(jnp.sum((logp - old_logp) * mask, axis=1, keepdims=True) / lengths)
    return jnp.exp(logp - old_logp)


def policy_loss(name: str, logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
                clip_low: float, clip_high: float) -> tuple[jax.Array, jax.Array]:
    """Per-token policy loss [rows, tokens] and 1.0 where it clipped, by name (`POLICY_LOSSES`), on the
    `importance_ratio`:

    ppo_clip: `clipped_surrogate`, the clip on each token's ratio;
    gspo: the same surrogate on each sequence's ratio, shared by its tokens (GSPO; TRL's
      importance_sampling_level="sequence"). GSPO's paper clips it far tighter than a token's (ranges of ~1e-4);
    cispo: -sg(min(ratio, 1 + clip_high)) * A * logp, the ratio clipped and detached into a weight, so every token
      keeps its gradient (CISPO; TRL's loss_type="cispo" with epsilon_high = 1 + clip_high). No lower clip.
    """
    if name not in POLICY_LOSSES:
        raise ValueError(f"policy loss must be one of {POLICY_LOSSES}, got {name!r}")
    ratio = importance_ratio(name, logp, old_logp, mask)
    if name == "cispo":
        weight = jax.lax.stop_gradient(jnp.minimum(ratio, 1.0 + clip_high))
        return -weight * advantages * logp, (ratio > 1.0 + clip_high).astype(jnp.float32)
    return _clipped(ratio, advantages, clip_low, clip_high)


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, ratio: jax.Array | None = None) -> jax.Array:
    """Per-token KL term of the k3 mode [rows, tokens]: k3(logp, ref_logp), times `ratio` (with its gradient)
    when given: the policy loss's `importance_ratio` (TRL's default `use_bias_correction_kl`). k3 estimates
    KL(policy || reference) on tokens drawn from the policy; the ratio corrects for their having been drawn from
    the old policy."""
    kl = k3(logp, ref_logp)
    return kl if ratio is None else kl * ratio


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
              kl_importance_ratio: bool = False, policy: str = "ppo_clip",
              correction: ISCorrection = ISCorrection()):
    """The policy update loss on a rollout batch: inputs, positions, segment_ids [rows, W]; targets, loss_mask
    (completion tokens), advantages, old_logp (pi_old: the trainer's policy at the start of the step's updates),
    ref_logp (k3 mode) [rows, C], over the last C input columns (`logprobs.target_hidden`); first_pass [rows]
    (1.0 where the parameters are still pi_old's, so old_logp is taken as this pass's own log-prob and the ratio
    is exactly 1). group > 1: rows come in runs of that many samples of one prompt, which then runs once
    (`logprobs.target_hidden`). kl_importance_ratio (k3 mode only): the KL term is k3 times the ratio
    (`kl_penalty`). policy: one of POLICY_LOSSES (`policy_loss`).

    With sampler_logp [rows, C] in the batch (the log-probs the rollout engine sampled the tokens with), the
    policy loss is weighted by `correction`'s importance weights (`off_policy.importance_weights`) and the
    metrics measure the sampler/trainer mismatch (`off_policy.mismatch_sums`) and count the tokens the
    correction masked (`is_masked_sum`) or truncated (`is_truncated_sum`).

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
    mask = batch["loss_mask"].astype(jnp.float32)
    per_token, clipped = policy_loss(policy, logp, old_logp, batch["advantages"], mask, clip_low, clip_high)
    metrics = {
        "clip_fraction_sum": jnp.sum(clipped * mask),
        "ratio_sum": jnp.sum(jnp.exp(logp - old_logp) * mask),
        "tokens": jnp.sum(mask),
        "entropy_sum": jnp.sum(jax.lax.stop_gradient(scored.entropy) * mask),
    }
    if "sampler_logp" in batch:
        metrics.update(mismatch_sums(old_logp, batch["sampler_logp"], mask))
        if correction.mode != "none":
            weights, masked, truncated = importance_weights(old_logp, batch["sampler_logp"], mask, correction)
            per_token = per_token * weights
            metrics.update(is_masked_sum=jnp.sum(masked * mask), is_truncated_sum=jnp.sum(truncated * mask))
    if kl_mode == "k3":
        ratio = importance_ratio(policy, logp, old_logp, mask) if kl_importance_ratio else None
        kl = kl_penalty(logp, batch["ref_logp"], ratio)
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
