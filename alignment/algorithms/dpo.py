"""Offline preference losses on sequence log-probabilities: the DPO family (paired) and KTO (unpaired).

Every batch row packs two sequences that share a prompt: segment 1 and segment 2, positions restarting at 0.
For DPO they are a pair's chosen and rejected completions; for KTO segment 1 is the example and segment 2 a
mismatched completion used only to estimate the KL reference point. A sequence's log-prob is the sum of
its completion tokens' log-probs (`loss_mask`); `ref_logps` [batch, 2] come with the batch, either stored
with the dataset by one precomputing pass or computed by the stage just before each step.

With h = (pi_c - ref_c) - (pi_r - ref_r) and beta, eps = label_smoothing, the pair losses are
    sigmoid (DPO; eps > 0 is conservative DPO): -(1 - eps) log s(beta h) - eps log s(-beta h)
    robust  (TRL's `robust`):  (-(1 - eps) log s(beta h) + eps log s(-beta h)) / (1 - 2 eps)
    hinge   (SLiC):            max(0, 1 - beta h)
    ipo     (TRL's form):      (h_len - 1 / (2 beta))^2, each log-ratio divided by its completion length
KTO (Ethayarajh et al. 2024, eq. 7), with z = max(0, mean(pi_kl - ref_kl)) held constant:
    desirable:   lambda_D (1 - s(beta (pi - ref - z)))      undesirable: lambda_U (1 - s(beta (z - pi + ref)))
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from alignment.algorithms.logprobs import token_logprobs
from alignment.data import preference


def segment_sums(x: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """x, segment_ids [batch, seq] -> [batch, num_segments]: x summed over each segment (1-based) in float32."""
    one_hot = (segment_ids[:, :, None] == jnp.arange(1, num_segments + 1)).astype(jnp.float32)
    return jnp.einsum("bs,bsk->bk", x.astype(jnp.float32), one_hot)


def sequence_logps(model: nn.Module, params: Any, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(summed completion log-probs [pairs, 2], completion lengths [pairs, 2]) of the pair rows in `batch`
    (one pair per row, or several: `data.preference.pack_pairs`)."""
    hidden = model.apply({"params": params}, *preference.model_inputs(batch))
    unembedding = model.apply({"params": params}, method="unembedding")
    mask = batch["loss_mask"].astype(jnp.float32)
    logp = token_logprobs(hidden, unembedding, batch["targets"], impl=model.config.logprob_impl or None) * mask
    k = preference.pairs_per_row(batch)
    per_pair = lambda x: preference.pair_columns(segment_sums(x, batch["segment_ids"], 2 * k), k)  # noqa: E731
    return per_pair(logp), per_pair(mask)


# --- paired losses: (logratios [pairs, 2], lengths [pairs, 2], beta, label_smoothing) -> [pairs] --------------

def sigmoid_loss(logratios, lengths, beta, label_smoothing):
    h = beta * (logratios[:, 0] - logratios[:, 1])
    return -(1 - label_smoothing) * jax.nn.log_sigmoid(h) - label_smoothing * jax.nn.log_sigmoid(-h)


def robust_loss(logratios, lengths, beta, label_smoothing):
    h = beta * (logratios[:, 0] - logratios[:, 1])
    loss = -(1 - label_smoothing) * jax.nn.log_sigmoid(h) + label_smoothing * jax.nn.log_sigmoid(-h)
    return loss / (1 - 2 * label_smoothing)


def hinge_loss(logratios, lengths, beta, label_smoothing):
    return jax.nn.relu(1 - beta * (logratios[:, 0] - logratios[:, 1]))


def ipo_loss(logratios, lengths, beta, label_smoothing):
    per_token = logratios / jnp.maximum(lengths, 1.0)
    return (per_token[:, 0] - per_token[:, 1] - 1 / (2 * beta)) ** 2


PAIR_LOSSES: dict[str, Callable] = {"sigmoid": sigmoid_loss, "robust": robust_loss, "hinge": hinge_loss,
                                    "ipo": ipo_loss}
LOSSES = (*PAIR_LOSSES, "kto")  # every value of config.loss the dpo stage accepts


def dpo_terms(logps: jax.Array, lengths: jax.Array, ref_logps: jax.Array, *, loss_type: str, beta: float,
              label_smoothing: float) -> tuple[jax.Array, dict]:
    """logps, lengths, ref_logps [pairs, 2] -> (summed loss, metric sums). Used by training and eval."""
    logratios = logps - ref_logps
    losses = PAIR_LOSSES[loss_type](logratios, lengths, beta, label_smoothing)
    rewards = beta * jax.lax.stop_gradient(logratios)
    metrics = {
        "accuracy": jnp.sum(rewards[:, 0] > rewards[:, 1]).astype(jnp.float32),
        "margin": jnp.sum(rewards[:, 0] - rewards[:, 1]),
        "reward_chosen": jnp.sum(rewards[:, 0]),
        "reward_rejected": jnp.sum(rewards[:, 1]),
        "logp_chosen": jnp.sum(jax.lax.stop_gradient(logps[:, 0])),
        "logp_rejected": jnp.sum(jax.lax.stop_gradient(logps[:, 1])),
    }
    return jnp.sum(losses), metrics


def dpo_loss(model: nn.Module, params: Any, batch: dict, rng: jax.Array, *, loss_type: str = "sigmoid",
             beta: float = 0.1, label_smoothing: float = 0.0):
    """batch: pair rows (inputs, targets, loss_mask, positions, segment_ids [rows, seq]), ref_logps [pairs, 2].

    Returns (summed loss, (pairs, metric sums)); `finalize_metrics` turns the sums into means.
    """
    del rng
    logps, lengths = sequence_logps(model, params, batch)
    loss_sum, metrics = dpo_terms(logps, lengths, batch["ref_logps"], loss_type=loss_type, beta=beta,
                                  label_smoothing=label_smoothing)
    metrics["tokens"] = jnp.sum(batch["segment_ids"] != 0).astype(jnp.float32)
    return loss_sum, (jnp.asarray(logps.shape[0], jnp.float32), metrics)


def kto_losses(logratios: jax.Array, kl_logratios: jax.Array, desirable: jax.Array, beta: float,
               desirable_weight: float, undesirable_weight: float) -> tuple[jax.Array, jax.Array]:
    """logratios, kl_logratios [n], desirable [n] bool -> (per-example loss [n], KL reference point z [])."""
    z = jax.lax.stop_gradient(jnp.maximum(jnp.mean(kl_logratios), 0.0))
    good = desirable_weight * (1 - jax.nn.sigmoid(beta * (logratios - z)))
    bad = undesirable_weight * (1 - jax.nn.sigmoid(beta * (z - logratios)))
    return jnp.where(desirable, good, bad), z


def kto_terms(logps: jax.Array, lengths: jax.Array, ref_logps: jax.Array, desirable: jax.Array, *, beta: float,
              desirable_weight: float, undesirable_weight: float) -> tuple[jax.Array, dict]:
    """logps, ref_logps [n, 2] (example, KL sample), desirable [n] -> (summed loss, metric sums)."""
    del lengths
    logratios = logps - ref_logps
    desirable = desirable.astype(bool)
    losses, z = kto_losses(logratios[:, 0], logratios[:, 1], desirable, beta, desirable_weight, undesirable_weight)
    rewards = beta * jax.lax.stop_gradient(logratios[:, 0])
    metrics = {
        "kl": z * losses.shape[0],  # summed like the others so finalize_metrics gives the mean
        "reward_desirable": jnp.sum(jnp.where(desirable, rewards, 0.0)),
        "reward_undesirable": jnp.sum(jnp.where(desirable, 0.0, rewards)),
        "desirable": jnp.sum(desirable).astype(jnp.float32),
    }
    return jnp.sum(losses), metrics


def kto_loss(model: nn.Module, params: Any, batch: dict, rng: jax.Array, *, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """batch: rows packing (example, mismatched KL completion), ref_logps [examples, 2], desirable [examples] bool.

    The KL reference point is the mean over this (micro-)batch, as TRL estimates it per device batch.
    """
    del rng
    logps, lengths = sequence_logps(model, params, batch)
    loss_sum, metrics = kto_terms(logps, lengths, batch["ref_logps"], batch["desirable"], beta=beta,
                                  desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    metrics["tokens"] = jnp.sum(batch["segment_ids"] != 0).astype(jnp.float32)
    return loss_sum, (jnp.asarray(logps.shape[0], jnp.float32), metrics)


def finalize_metrics(sums: dict) -> dict:
    """Metric sums (with `count` = pairs or examples) -> means; KTO rewards average over their own class."""
    out = dict(sums)
    n = jnp.maximum(sums["count"], 1.0)
    for key in ("accuracy", "margin", "reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected", "kl"):
        if key in sums:
            out[key] = sums[key] / n
    if "desirable" in sums:
        out["reward_desirable"] = sums["reward_desirable"] / jnp.maximum(sums["desirable"], 1.0)
        out["reward_undesirable"] = sums["reward_undesirable"] / jnp.maximum(sums["count"] - sums["desirable"], 1.0)
    return out
