"""Supervised fine-tuning: cross-entropy on the tokens the data marks for the loss."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from alignment.algorithms.logprobs import token_logprobs

NORMALIZATIONS = ("token", "sample")


def segment_token_counts(loss_mask: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """[batch, seq]: for each token, how many loss tokens its sample (row, segment) has."""
    rows = jnp.arange(loss_mask.shape[0])[:, None]
    per_segment = jnp.zeros((loss_mask.shape[0], loss_mask.shape[1] + 1), jnp.float32)
    per_segment = per_segment.at[rows, segment_ids].add(loss_mask.astype(jnp.float32))
    return jnp.take_along_axis(per_segment, segment_ids, axis=1)


def sft_loss(model: nn.Module, params: Any, batch: dict, rng: jax.Array, normalization: str = "token"):
    """batch: inputs, targets, loss_mask, positions, segment_ids, all [batch, seq].

    Returns (loss_sum, (count, metrics)); the step divides global sums by global counts, so:
      token:  sum of token NLLs / number of loss tokens in the global batch (the default);
      sample: sum over samples of each sample's mean token NLL / number of samples.
    """
    del rng
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"loss normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    hidden = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
    unembedding = model.apply({"params": params}, method="unembedding")
    nll = -token_logprobs(hidden, unembedding, batch["targets"], impl=model.config.logprob_impl or None)
    mask = batch["loss_mask"].astype(jnp.float32)
    token_sum, tokens_in_loss = jnp.sum(nll * mask), jnp.sum(mask)
    if normalization == "token":
        loss_sum, count = token_sum, tokens_in_loss
    else:
        per_sample = segment_token_counts(mask, batch["segment_ids"])
        loss_sum = jnp.sum(nll * mask / jnp.maximum(per_sample, 1.0))
        count = jnp.sum(mask / jnp.maximum(per_sample, 1.0))  # each sample with loss tokens adds 1
    metrics = {
        "tokens": jnp.sum(batch["segment_ids"] != 0).astype(jnp.float32),
        "slots": jnp.asarray(batch["segment_ids"].size, jnp.float32),
        "token_nll_sum": token_sum,
        "loss_tokens": tokens_in_loss,
    }
    return loss_sum, (count, metrics)
