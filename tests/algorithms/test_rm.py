"""Reward-model loss against a float64 numpy implementation and TRL golden values."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from alignment.algorithms import rm
from tests import FIXTURES



def numpy_rm_loss(r_c, r_r, s_c, s_r, has, margin, alpha):
    """Baichuan Alignment RM loss: -log s(r_c - r_r - m) + alpha * has * ((r_c - s_c)^2 + (r_r - s_r)^2)."""
    ranking = np.logaddexp(0.0, -(r_c - r_r - margin))
    return ranking + alpha * has * ((r_c - s_c) ** 2 + (r_r - s_r) ** 2)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 2.0])
def test_bradley_terry_with_scores_matches_numpy(alpha):
    rng = np.random.default_rng(int(alpha * 10))
    n = 24
    r_c, r_r = rng.normal(0, 2, n), rng.normal(0, 2, n)
    s_c, s_r = rng.random(n), rng.random(n)
    has = (rng.random(n) < 0.5).astype(np.float64)  # mixed: unscored pairs get no regression term
    margin = rng.random(n) * has
    expected = numpy_rm_loss(r_c, r_r, s_c, s_r, has, margin, alpha)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    got = rm.bradley_terry_losses(f32(r_c), f32(r_r), f32(s_c), f32(s_r), f32(has), f32(margin), alpha)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
    assert 0 < has.sum() < n


def test_segment_last_picks_each_sequences_final_token():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(3, 9)).astype(np.float32)
    seg = np.array([[1, 1, 1, 2, 2, 0, 0, 0, 0], [1, 2, 2, 2, 2, 2, 2, 2, 2], [1, 1, 1, 1, 0, 0, 0, 0, 0]])
    got = np.asarray(rm.segment_last(jnp.asarray(values), jnp.asarray(seg), 2))
    np.testing.assert_array_equal(got, [[values[0, 2], values[0, 4]], [values[1, 0], values[1, 8]],
                                        [values[2, 3], 0.0]])


def test_reward_loss_matches_trl_golden():
    path = FIXTURES / "trl_reward.json"
    if not path.is_file():
        pytest.skip(f"{path} missing; make it with tests/fixtures/make_trl_golden.py")
    for case in json.loads(path.read_text())["cases"]:
        r_c, r_r = np.array(case["rewards_chosen"]), np.array(case["rewards_rejected"])
        margin = np.array(case.get("margin", np.zeros_like(r_c)))
        zeros = jnp.zeros(len(r_c))
        losses = rm.bradley_terry_losses(jnp.asarray(r_c, jnp.float32), jnp.asarray(r_r, jnp.float32), zeros,
                                             zeros, zeros, jnp.asarray(margin, jnp.float32), 0.0)
        assert float(jnp.mean(losses)) == pytest.approx(case["trl_loss"], rel=1e-5, abs=1e-6)


def test_finalize_metrics_means_and_calibration():
    sums = {"count": jnp.float32(4), "accuracy": jnp.float32(3), "margin": jnp.float32(2.0),
            "reward_chosen": jnp.float32(4.0), "reward_rejected": jnp.float32(2.0),
            "score_sq_error": jnp.float32(0.5), "scored_pairs": jnp.float32(2), "tokens": jnp.float32(100)}
    out = rm.finalize_metrics(sums)
    assert float(out["accuracy"]) == 0.75 and float(out["margin"]) == 0.5
    assert float(out["score_rmse"]) == pytest.approx(np.sqrt(0.5 / 4))
