"""GRPO's per-token loss and aggregations against TRL 1.16's GRPOTrainer on a stored golden fixture.

The fixture (tests/fixtures/trl_grpo.json, made by make_trl_grpo_golden.py) holds TRL's loss and its gradient
w.r.t. the per-token log-probs for each loss type. Here the same loss is built from this project's pieces:

  per_token = clipped_surrogate(logp, old_logp, A, epsilon_low, epsilon_high) + beta * kl
  loss      = aggregate(per_token, mask, AGGREGATION[loss_type], max_completion_length), sum / count

TRL loss type -> our aggregation: grpo -> seq_mean_token_mean, bnpo and dapo -> token_mean (one process, no
accumulation: the local and the global token count agree), dr_grpo -> constant with max_tokens =
max_completion_length. kl is our `kl_penalty(logp, ref_logp, ratio)`: k3 as is when TRL's use_bias_correction_kl
is off, times the importance ratio exp(logp - old_logp) when it is on (TRL's default; our `rl.kl_importance_ratio`).
An absent old_logp is TRL's on-policy case: old_logp = stop_gradient(logp), as our first pass does.

The fixture's `model_cases` also pin TRL's sampling temperature: TRL computes their log-probs itself from final
hidden states and an output head at temperature 1.0 or 0.7, and they run here through `grpo_loss` itself (our
fused log-prob kernel at that temperature, then the loss), compared on the log-probs, the loss, the KL metric
and the gradients w.r.t. the hidden states and the head.

The fixture's `off_policy_cases` run the same way for GSPO (TRL's importance_sampling_level="sequence", whose
sequence ratio also weights the KL term), CISPO (TRL's cap epsilon_high is our 1 + clip_high) and TRL's
importance-sampling correction of sampler log-probs in its four modes, whose weights TRL's own
`_generate_and_score_completions` computed: ours must give the same weights, loss, KL and gradients.
"""
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignment.algorithms.grpo import aggregate, clipped_surrogate, grpo_loss, kl_form, kl_penalty
from alignment.algorithms.logprobs import logprobs_entropy_kl
from alignment.algorithms.off_policy import ISCorrection, importance_weights
from tests import FIXTURES

FIXTURE = FIXTURES / "trl_grpo.json"
AGGREGATION = {"grpo": "seq_mean_token_mean", "bnpo": "token_mean", "dapo": "token_mean", "dr_grpo": "constant"}
MODEL_CASES = json.loads(FIXTURE.read_text())["model_cases"] if FIXTURE.exists() else []


def load_cases(kind="cases"):
    if not FIXTURE.exists():
        pytest.skip(f"{FIXTURE} missing; make it with tests/fixtures/make_trl_grpo_golden.py")
    return json.loads(FIXTURE.read_text())[kind]


def trl_equivalent_loss(case, dtype):
    """fn(logp [rows, tokens]) -> (loss, (its count, token mean of the KL term)): TRL's GRPO loss for `case`,
    composed from our pieces; TRL logs the KL term's token mean as its `kl` metric."""
    as_array = lambda key: jnp.asarray(case[key], dtype)
    mask, ref, advantages = as_array("completion_mask"), as_array("ref_per_token_logps"), as_array("advantages")
    aggregation = AGGREGATION[case["trl_loss_type"]]
    assert aggregation == case["ours"]

    def loss(logp):
        old = jax.lax.stop_gradient(logp) if case["old_per_token_logps"] is None else as_array("old_per_token_logps")
        per_token, _ = clipped_surrogate(logp, old, advantages[:, None], case["epsilon_low"], case["epsilon_high"])
        kl = kl_penalty(logp, ref, jnp.exp(logp - old) if case["use_bias_correction_kl"] else None)
        total, count = aggregate(per_token + case["beta"] * kl, mask, aggregation, case["max_completion_length"])
        kl_sum, tokens = aggregate(kl, mask, "token_mean", case["max_completion_length"])
        return total / count, (count, kl_sum / tokens)

    return loss


def test_fixture_covers_the_loss_types_and_kl_variants():
    cases = load_cases()
    variants = {(c["trl_loss_type"], c["use_bias_correction_kl"]) for c in cases if c["beta"] > 0}
    assert variants == {(t, b) for t in AGGREGATION for b in (True, False)}
    model_cases = load_cases("model_cases")
    variants = {(c["trl_loss_type"], c["use_bias_correction_kl"], c["temperature"]) for c in model_cases}
    assert variants == {(t, b, temperature) for t in AGGREGATION for b in (True, False) for temperature in (1.0, 0.7)}
    for case in cases + model_cases:
        # The settings under which our aggregations are TRL's: token-level ratios, no two-sided clip, no row
        # without completion tokens (TRL's grpo / dr_grpo count such rows, ours do not).
        assert case["importance_sampling_level"] == "token" and case["delta"] is None
        assert min(np.sum(case["completion_mask"], axis=1)) >= 1


@pytest.mark.parametrize("dtype, rtol", [(jnp.float64, 1e-12), (jnp.float32, 1e-6)])
def test_grpo_loss_and_gradient_match_trl(dtype, rtol):
    with jax.enable_x64(dtype == jnp.float64):
        for case in load_cases():
            name = f"{case['trl_loss_type']} bias_correction_kl={case['use_bias_correction_kl']} beta={case['beta']}"
            loss = trl_equivalent_loss(case, dtype)
            logp = jnp.asarray(case["per_token_logps"], dtype)
            (value, (count, kl_mean)), grad = jax.value_and_grad(loss, has_aux=True)(logp)
            if case["trl_loss_type"] == "dapo":  # TRL's normaliser is its num_items_in_batch input
                assert float(count) == case["num_items_in_batch"], name
            assert abs(float(value) - case["trl_loss"]) <= rtol * max(abs(case["trl_loss"]), 1.0), name
            if case["beta"] > 0:
                assert abs(float(kl_mean) - case["trl_kl"]) <= rtol * max(case["trl_kl"], 1.0), name
            expected = np.asarray(case["trl_grad_per_token_logps"])
            # Gradients are ~1 / count per token: compare relative to the largest.
            assert np.abs(np.asarray(grad, np.float64) - expected).max() <= rtol * np.abs(expected).max(), name


class FixedHidden:
    """Stands in for the Transformer in `grpo_loss`: its forward returns params["hidden"] [rows, C, d], the final
    hidden states that predict the C targets, and its output head is params["unembedding"] [d, vocab]."""

    config = types.SimpleNamespace(logprob_impl="")  # the backend's default kernel, as a run uses

    def apply(self, variables, *inputs, method=None):
        params = variables["params"]
        return params["unembedding"] if method == "unembedding" else params["hidden"]


def model_case_batch(case):
    """grpo_loss's batch for a model case: the completion tokens as targets, TRL's inputs as given."""
    mask = np.asarray(case["completion_mask"], np.float32)
    rows, tokens = mask.shape
    on_policy = case["old_per_token_logps"] is None
    return {
        "inputs": np.zeros((rows, tokens), np.int32), "positions": np.zeros((rows, tokens), np.int32),
        "segment_ids": np.ones((rows, tokens), np.int32), "targets": np.asarray(case["completion_ids"], np.int32),
        "loss_mask": mask,
        "advantages": np.broadcast_to(np.asarray(case["advantages"], np.float32)[:, None], mask.shape),
        "old_logp": np.zeros_like(mask) if on_policy else np.asarray(case["old_per_token_logps"], np.float32),
        "ref_logp": np.asarray(case["ref_per_token_logps"], np.float32),
        "first_pass": np.full(rows, float(on_policy), np.float32),
    }


def case_name(case):
    return (f"{case['trl_loss_type']}-bias_correction_kl={case['use_bias_correction_kl']}-"
            f"T={case['temperature']}{'-on_policy' if case['old_per_token_logps'] is None else ''}")


target_logprobs = jax.jit(lambda hidden, unembedding, targets, temperature: logprobs_entropy_kl(
    hidden, unembedding, targets, temperature=temperature).logp, static_argnums=3)


@pytest.mark.parametrize("case", MODEL_CASES, ids=[case_name(c) for c in MODEL_CASES])
def test_grpo_loss_matches_trl_through_the_temperature(case):
    params = {"hidden": jnp.asarray(case["hidden"], jnp.float32),
              "unembedding": jnp.asarray(case["unembedding"], jnp.float32)}
    batch = model_case_batch(case)
    mask = batch["loss_mask"] > 0
    logp = target_logprobs(params["hidden"], params["unembedding"], batch["targets"], case["temperature"])
    np.testing.assert_allclose(np.asarray(logp)[mask], np.asarray(case["trl_per_token_logps"])[mask],
                               rtol=1e-5, atol=1e-5)

    def loss(params):
        total, (count, metrics) = grpo_loss(
            FixedHidden(), params, batch, None, temperature=case["temperature"], clip_low=case["epsilon_low"],
            clip_high=case["epsilon_high"], kl_mode="k3", beta=case["beta"], aggregation=case["ours"],
            max_tokens=case["max_completion_length"], kl_importance_ratio=case["use_bias_correction_kl"])
        return total / count, metrics

    (value, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert abs(float(value) - case["trl_loss"]) <= 1e-5 * max(abs(case["trl_loss"]), 1.0)
    # The KL metric is named by its form and is TRL's `kl` (the token mean of the term in the loss).
    form = kl_form(case["use_bias_correction_kl"])
    assert {k for k in metrics if k.startswith("k3")} == {f"{form}_sum"}
    kl_mean = float(metrics[f"{form}_sum"] / metrics["tokens"])
    assert abs(kl_mean - case["trl_kl"]) <= 1e-5 * max(case["trl_kl"], 1.0)
    for key in ("hidden", "unembedding"):
        expected = np.asarray(case[f"trl_grad_{key}"])
        assert np.abs(np.asarray(grads[key]) - expected).max() <= 1e-5 * np.abs(expected).max(), key


OFF_POLICY_CASES = json.loads(FIXTURE.read_text()).get("off_policy_cases", []) if FIXTURE.exists() else []
IS_MODES = {"truncate": "tis", "mask": "mis"}


def off_policy_settings(case):
    """grpo_loss's policy, clip_high and ISCorrection for a TRL off-policy case: importance_sampling_level
    'sequence' is GSPO; CISPO's cap epsilon_high is our 1 + clip_high; vllm_importance_sampling_mode
    '<level>_<truncate|mask>' with clip_min / clip_max is our correction at that level (no clip_min: low 0)."""
    sequence = case["importance_sampling_level"] == "sequence"
    policy = "cispo" if case["trl_loss_type"] == "cispo" else "gspo" if sequence else "ppo_clip"
    clip_high = case["epsilon_high"] - 1.0 if policy == "cispo" else case["epsilon_high"]
    correction = ISCorrection()
    if case.get("is_mode"):
        level, mode = case["is_mode"].split("_")
        correction = ISCorrection(IS_MODES[mode], level, case["is_clip_min"] or 0.0, case["is_clip_max"])
    return policy, clip_high, correction


def test_off_policy_fixture_covers_gspo_cispo_and_every_correction():
    cases = OFF_POLICY_CASES or load_cases("off_policy_cases")
    assert {off_policy_settings(c)[0] for c in cases} == {"ppo_clip", "gspo", "cispo"}
    assert {c["is_mode"] for c in cases if c.get("is_mode")} == {f"{level}_{mode}" for level in ("token", "sequence")
                                                               for mode in ("truncate", "mask")}


@pytest.mark.parametrize("case", OFF_POLICY_CASES, ids=[
    f"{c['trl_loss_type']}-{c['importance_sampling_level']}-{c.get('is_mode')}-T={c['temperature']}"
    for c in OFF_POLICY_CASES])
def test_off_policy_losses_match_trl(case):
    policy, clip_high, correction = off_policy_settings(case)
    params = {"hidden": jnp.asarray(case["hidden"], jnp.float32),
              "unembedding": jnp.asarray(case["unembedding"], jnp.float32)}
    batch = model_case_batch(case)
    if case.get("is_mode"):
        batch["sampler_logp"] = np.asarray(case["sampling_per_token_logps"], np.float32)
        mask = batch["loss_mask"]
        weights, _, _ = importance_weights(batch["old_logp"], batch["sampler_logp"], mask, correction)
        expected = np.broadcast_to(np.asarray(case["trl_importance_sampling_ratio"]), mask.shape)
        np.testing.assert_allclose(np.asarray(weights)[mask > 0], expected[mask > 0], rtol=2e-6)

    def loss(params):
        total, (count, metrics) = grpo_loss(
            FixedHidden(), params, batch, None, temperature=case["temperature"], clip_low=case["epsilon_low"],
            clip_high=clip_high, kl_mode="k3", beta=case["beta"], aggregation=case["ours"],
            max_tokens=case["max_completion_length"], kl_importance_ratio=case["use_bias_correction_kl"],
            policy=policy, correction=correction)
        return total / count, metrics

    (value, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert abs(float(value) - case["trl_loss"]) <= 1e-5 * max(abs(case["trl_loss"]), 1.0)
    if case["beta"] > 0:
        kl_mean = float(metrics[f"{kl_form(case['use_bias_correction_kl'])}_sum"] / metrics["tokens"])
        assert abs(kl_mean - case["trl_kl"]) <= 1e-5 * max(case["trl_kl"], 1.0)
    for key in ("hidden", "unembedding"):
        expected = np.asarray(case[f"trl_grad_{key}"])
        assert np.abs(np.asarray(grads[key]) - expected).max() <= 1e-5 * np.abs(expected).max(), key
