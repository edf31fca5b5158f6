"""Supervised fine-tuning: cross-entropy on the tokens the data marks for the loss."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from alignment.algorithms.logprobs import token_logprobs


def sft_loss(model: nn.Module, params: Any, batch: dict, rng: jax.Array):
    """batch: inputs, targets, loss_mask, positions, segment_ids, all [batch, seq].

    Returns (summed negative log-likelihood, (number of loss tokens, metrics)).
    """
    del rng
    hidden = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
    unembedding = model.apply({"params": params}, method="unembedding")
    logp = token_logprobs(hidden, unembedding, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    nll_sum = -jnp.sum(logp * mask)
    count = jnp.sum(mask)
    tokens = jnp.sum(batch["segment_ids"] != 0).astype(jnp.float32)
    return nll_sum, (count, {"tokens": tokens})
