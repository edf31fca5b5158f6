"""GRPO's per-token loss and aggregations against TRL 1.16's GRPOTrainer on a stored golden fixture.

The fixture (tests/fixtures/trl_grpo.json, made by make_trl_grpo_golden.py) holds TRL's loss and its gradient
w.r.t. the per-token log-probs for each loss type. Here the same loss is built from this project's pieces:

  per_token = clipped_surrogate(logp, old_logp, A, epsilon_low, epsilon_high) + beta * kl
  loss      = aggregate(per_token, mask, AGGREGATION[loss_type], max_completion_length), sum / count

TRL loss type -> our aggregation: grpo -> seq_mean_token_mean, bnpo and dapo -> token_mean (one process, no
accumulation: the local and the global token count agree), dr_grpo -> constant with max_tokens =
max_completion_length. kl is our k3(logp, ref_logp) as is when TRL's use_bias_correction_kl is off; when it is
on (TRL's default) TRL multiplies k3 by the importance ratio exp(logp - old_logp), differentiable, and the
test composes exactly that from our k3 (`grpo_loss` itself adds the plain k3 only). An absent old_logp is
TRL's on-policy case: old_logp = stop_gradient(logp), as our first pass does.
"""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignment.algorithms.grpo import aggregate, clipped_surrogate, k3

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "trl_grpo.json"
AGGREGATION = {"grpo": "seq_mean_token_mean", "bnpo": "token_mean", "dapo": "token_mean", "dr_grpo": "constant"}


def load_cases():
    if not FIXTURE.exists():
        pytest.skip(f"{FIXTURE} missing; make it with tests/fixtures/make_trl_grpo_golden.py")
    return json.loads(FIXTURE.read_text())["cases"]


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
        kl = k3(logp, ref)
        if case["use_bias_correction_kl"]:
            kl = kl * jnp.exp(logp - old)
        total, count = aggregate(per_token + case["beta"] * kl, mask, aggregation, case["max_completion_length"])
        kl_sum, tokens = aggregate(kl, mask, "token_mean", case["max_completion_length"])
        return total / count, (count, kl_sum / tokens)

    return loss


def test_fixture_covers_the_loss_types_and_kl_variants():
    cases = load_cases()
    variants = {(c["trl_loss_type"], c["use_bias_correction_kl"]) for c in cases if c["beta"] > 0}
    assert variants == {(t, b) for t in AGGREGATION for b in (True, False)}
    for case in cases:
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
