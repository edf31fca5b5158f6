"""The policy's log-probs of its own rollouts and their KL to the frozen reference, in one jitted call."""
from __future__ import annotations

import jax

from alignment.algorithms import grpo
from alignment.algorithms.logprobs import logprobs_entropy_kl, target_hidden, token_logprobs
from alignment.models import Transformer

KL_ESTIMATORS = ("top_k", "k3")


def make_scorer(model: Transformer, temperature: float, kl_estimator: str, kl_top_k: int, *,
                policy: bool = True, group: int = 1) -> callable:
    """Jitted score(params, ref_params, batch) -> {old_logp, entropy, kl (, ref_logp)}, all [rows, C] like
    batch["targets"].

    kl_estimator: top_k (the paper's exact KL(policy || reference) over the reference's top-K tokens) or k3
    (the sampled-token estimator, which also returns the reference's log-probs `ref_logp`).
    policy=False (k3 only): just {ref_logp}, for an update that recomputes the policy's log-probs itself
    (one on-policy pass), which saves a whole forward pass of the policy. group > 1: the rows come in runs of
    that many samples of one prompt, which then runs once per model (`logprobs.target_hidden`).
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if not policy and kl_estimator != "k3":
        raise ValueError("the top_k KL needs the policy's pass: policy=False goes with kl_estimator='k3'")
    impl = model.config.logprob_impl or None

    @jax.jit
    def score(params, ref_params, batch):
        unembed = lambda p: model.apply({"params": p}, method="unembedding")
        ref_hidden = target_hidden(model, ref_params, batch, group)
        if not policy:
            return {"ref_logp": token_logprobs(ref_hidden, unembed(ref_params), batch["targets"], temperature,
                                               impl=impl)}
        hidden = target_hidden(model, params, batch, group)
        out = {}
        if kl_estimator == "top_k":
            ids, ref_lp = grpo.reference_topk(ref_hidden, unembed(ref_params), kl_top_k, temperature)
            scored = logprobs_entropy_kl(hidden, unembed(params), batch["targets"], temperature=temperature,
                                         ref_topk_ids=ids, ref_topk_logprobs=ref_lp, with_entropy=True, impl=impl)
            out["kl"] = scored.kl
        else:
            scored = logprobs_entropy_kl(hidden, unembed(params), batch["targets"], temperature=temperature,
                                         with_entropy=True, impl=impl)
            out["ref_logp"] = token_logprobs(ref_hidden, unembed(ref_params), batch["targets"], temperature,
                                             impl=impl)
            out["kl"] = grpo.k3(scored.logp, out["ref_logp"])
        out["old_logp"], out["entropy"] = scored.logp, scored.entropy
        return out

    return score
