"""DPO family and KTO losses against float64 numpy implementations of the published formulas and TRL golden values."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignment.algorithms import dpo
from tests import FIXTURES



def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def numpy_pair_loss(name, pi, ref, lengths, beta, eps):
    """Published formulas in float64. pi, ref, lengths [n, 2] (chosen, rejected)."""
    ratio = pi - ref
    h = ratio[:, 0] - ratio[:, 1]
    if name == "sigmoid":  # Rafailov et al. 2023; eps > 0: conservative DPO (Mitchell 2023)
        return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    if name == "robust":  # Chowdhury et al. 2024, as TRL writes it
        return (-(1 - eps) * log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h)) / (1 - 2 * eps)
    if name == "hinge":  # SLiC-HF (Zhao et al. 2023)
        return np.maximum(0.0, 1 - beta * h)
    if name == "ipo":  # Azar et al. 2023 eq. 17, per-token log-ratios
        per_token = ratio / lengths
        return (per_token[:, 0] - per_token[:, 1] - 1 / (2 * beta)) ** 2
    raise KeyError(name)


def draw(seed, n=16):
    rng = np.random.default_rng(seed)
    pi = rng.normal(-40.0, 8.0, (n, 2))
    ref = pi + rng.normal(0.0, 3.0, (n, 2))
    lengths = rng.integers(1, 60, (n, 2)).astype(np.float64)
    return pi, ref, lengths


@pytest.mark.parametrize("name,beta,eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.3, 0.2), ("robust", 0.1, 0.1),
                                           ("hinge", 0.2, 0.0), ("ipo", 0.5, 0.0)])
def test_pair_losses_match_numpy_float64(name, beta, eps):
    pi, ref, lengths = draw(sum(map(ord, name)) + int(beta * 100))
    expected = numpy_pair_loss(name, pi, ref, lengths, beta, eps)
    got = dpo.PAIR_LOSSES[name](jnp.asarray(pi - ref, jnp.float32), jnp.asarray(lengths, jnp.float32), beta, eps)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-5, atol=2e-5)


def numpy_kto(pi, ref, kl_pi, kl_ref, desirable, beta, w_d, w_u):
    """Ethayarajh et al. 2024 eq. 7 with z = max(0, mean KL estimate)."""
    z = max(0.0, float(np.mean(kl_pi - kl_ref)))
    r = pi - ref
    return np.where(desirable, w_d * (1 - sigmoid(beta * (r - z))), w_u * (1 - sigmoid(beta * (z - r)))), z


def test_kto_matches_numpy_float64():
    rng = np.random.default_rng(3)
    pi, ref = rng.normal(-30, 5, 12), rng.normal(-30, 5, 12)
    kl_pi, kl_ref = rng.normal(-50, 5, 12), rng.normal(-52, 5, 12)  # positive mean KL
    desirable = rng.random(12) < 0.5
    expected, z = numpy_kto(pi, ref, kl_pi, kl_ref, desirable, 0.1, 1.0, 1.33)
    got, got_z = dpo.kto_losses(jnp.asarray(pi - ref, jnp.float32), jnp.asarray(kl_pi - kl_ref, jnp.float32),
                                jnp.asarray(desirable), 0.1, 1.0, 1.33)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
    assert abs(float(got_z) - z) < 1e-4 and z > 0
    # A negative KL estimate clamps to 0.
    _, zero = dpo.kto_losses(jnp.zeros(3), -jnp.ones(3), jnp.ones(3, bool), 0.1, 1.0, 1.0)
    assert float(zero) == 0.0


def test_segment_sums():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 10)).astype(np.float32)
    seg = np.array([[1, 1, 1, 2, 2, 0, 0, 0, 0, 0], [1, 2, 2, 2, 2, 2, 2, 0, 0, 0], [1] * 10])
    got = np.asarray(dpo.segment_sums(jnp.asarray(x), jnp.asarray(seg), 2))
    expected = np.stack([[x[b][seg[b] == k].sum() for k in (1, 2)] for b in range(3)])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def load_fixture(name):
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"{path} missing; make it with tests/fixtures/make_trl_golden.py")
    return json.loads(path.read_text())


def test_dpo_losses_match_trl_golden():
    fixture = load_fixture("trl_dpo.json")
    for case in fixture["cases"]:
        pi = np.array([case["policy_chosen_logps"], case["policy_rejected_logps"]]).T
        ref = np.array([case["ref_chosen_logps"], case["ref_rejected_logps"]]).T
        lengths = np.array([case["chosen_lengths"], case["rejected_lengths"]], np.float32).T
        ours = dpo.PAIR_LOSSES[case["ours"]]
        losses = ours(jnp.asarray(pi - ref, jnp.float32), jnp.asarray(lengths), case["beta"], case["label_smoothing"])
        assert float(jnp.mean(losses)) == pytest.approx(case["trl_loss"], rel=1e-5, abs=1e-6), case["trl_loss_type"]


def test_kto_loss_matches_trl_golden():
    fixture = load_fixture("trl_kto.json")
    for case in fixture["cases"]:
        losses, z = dpo.kto_losses(
            jnp.asarray(np.subtract(case["policy_logps"], case["ref_logps"]), jnp.float32),
            jnp.asarray(np.subtract(case["policy_kl_logps"], case["ref_kl_logps"]), jnp.float32),
            jnp.asarray(case["labels"]), case["beta"], case["desirable_weight"], case["undesirable_weight"])
        assert float(z) == pytest.approx(case["trl_kl"], rel=1e-5, abs=1e-5)
        assert float(jnp.mean(losses)) == pytest.approx(case["trl_loss"], rel=1e-5, abs=1e-6)


def test_gradient_of_sigmoid_loss_matches_numpy():
    """d loss / d pi_chosen = -beta (1 - eps - sigmoid(beta h)) for conservative DPO."""
    pi, ref, lengths = draw(7, n=4)
    beta, eps = 0.2, 0.1
    grad = jax.grad(lambda r: jnp.sum(dpo.sigmoid_loss(r, None, beta, eps)))(jnp.asarray(pi - ref, jnp.float32))
    h = (pi - ref)[:, 0] - (pi - ref)[:, 1]
    expected = -beta * (1 - eps - sigmoid(beta * h))
    np.testing.assert_allclose(np.asarray(grad[:, 0]), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad[:, 1]), -expected, rtol=1e-5, atol=1e-6)
