"""Importance weights and mismatch metrics against float64 numpy references of their definitions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignment.algorithms.off_policy import IS_LEVELS, IS_MODES, ISCorrection, importance_weights, mismatch_sums

RNG = np.random.default_rng(7)


def numpy_weights(old, sampler, mask, mode, level, low, high):
    """The published definitions, row by row: w = pi_old / mu per token, or the product over a sequence's real
    tokens; TIS truncates w to [low, high], MIS zeroes it outside (weights, masked, truncated)."""
    rows, tokens = old.shape
    w = np.ones((rows, tokens))
    for r in range(rows):
        real = mask[r]
        if level == "token":
            w[r, real] = np.exp(old[r, real] - sampler[r, real])
        else:
            w[r, :] = np.exp(np.sum(old[r, real] - sampler[r, real]))
    outside = (w < low) | (w > high)
    if mode == "tis":
        return np.clip(w, low, high), np.zeros_like(w), outside
    if mode == "mis":
        return np.where(outside, 0.0, w), outside, np.zeros_like(w)
    return np.ones_like(w), np.zeros_like(w), np.zeros_like(w)


@pytest.mark.parametrize("mode", IS_MODES)
@pytest.mark.parametrize("level", IS_LEVELS)
def test_importance_weights_match_the_definitions(mode, level):
    old = RNG.normal(-2.0, 0.5, (16, 9))
    sampler = old + RNG.normal(0.0, 0.4 if level == "token" else 0.15, old.shape)
    mask = RNG.random(old.shape) < 0.8
    mask[:, 0] = True
    low, high = 0.5, 1.6
    with jax.enable_x64(True):
        got = importance_weights(jnp.asarray(old), jnp.asarray(sampler), jnp.asarray(mask),
                                 ISCorrection(mode, level, low, high))
        expected = numpy_weights(old, sampler, mask, mode, level, low, high)
        for name, g, e in zip(("weights", "masked", "truncated"), got, expected):
            np.testing.assert_allclose(np.asarray(g)[mask], np.asarray(e, np.float64)[mask], rtol=1e-12, err_msg=name)
    if mode != "none":  # the thresholds bind somewhere, or the test checks nothing
        assert 0 < (expected[1] + expected[2])[mask].mean() < 1


def test_sequence_weights_survive_overflow():
    old = np.zeros((2, 4), np.float32)
    sampler = np.full((2, 4), -40.0, np.float32)  # sum of log-ratios 160: exp overflows float32
    sampler[1] = 0.0
    mask = np.ones((2, 4), bool)
    w, _, truncated = importance_weights(old, sampler, mask, ISCorrection("tis", "sequence", 0.0, 2.0))
    np.testing.assert_array_equal(np.asarray(w), [[2.0] * 4, [1.0] * 4])
    assert np.asarray(truncated)[0].all() and not np.asarray(truncated)[1].any()
    w, masked, _ = importance_weights(old, sampler, mask, ISCorrection("mis", "sequence", 0.5, 2.0))
    np.testing.assert_array_equal(np.asarray(w), [[0.0] * 4, [1.0] * 4])
    assert np.asarray(masked)[0].all() and np.isfinite(np.asarray(w)).all()


def test_importance_weights_carry_no_gradient():
    old, sampler, mask = jnp.asarray([[-1.0, -2.0]]), jnp.asarray([[-1.5, -1.0]]), jnp.ones((1, 2))
    grad = jax.grad(lambda o: jnp.sum(importance_weights(o, sampler, mask, ISCorrection("tis"))[0]))(old)
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="mode in .* got 'ttis'"):
        importance_weights(jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.ones((1, 1)), ISCorrection("ttis"))


def test_mismatch_sums_match_the_definitions_and_vanish_when_the_policies_agree():
    trainer = RNG.normal(-2.0, 0.5, (5, 7))
    sampler = trainer + RNG.normal(0.0, 0.05, trainer.shape)
    mask = RNG.random(trainer.shape) < 0.7
    sampler[~mask] = 0.0  # padding holds anything: it must not count
    d = (trainer - sampler)[mask]
    with jax.enable_x64(True):
        got = mismatch_sums(jnp.asarray(trainer), jnp.asarray(sampler), jnp.asarray(mask))
        np.testing.assert_allclose(float(got["mismatch_kl_sum"]), np.sum(np.exp(d) - d - 1), rtol=1e-9)
        np.testing.assert_allclose(float(got["mismatch_abs_log_ratio_sum"]), np.abs(d).sum(), rtol=1e-12)
        assert float(got["mismatch_abs_log_ratio_max"]) == np.abs(d).max()
    same = mismatch_sums(jnp.asarray(trainer, jnp.float32), jnp.asarray(trainer, jnp.float32), jnp.asarray(mask))
    assert all(float(v) == 0.0 for v in same.values())
    # KL(mu || pi) of two categorical distributions, estimated from samples of mu by the k3 sum: unbiased.
    mu, pi = np.array([0.5, 0.3, 0.2]), np.array([0.4, 0.4, 0.2])
    draws = RNG.choice(3, size=200_000, p=mu)
    kl = mismatch_sums(jnp.asarray(np.log(pi)[draws][None]), jnp.asarray(np.log(mu)[draws][None]),
                       jnp.ones((1, draws.size)))["mismatch_kl_sum"] / draws.size
    np.testing.assert_allclose(float(kl), np.sum(mu * np.log(mu / pi)), rtol=0.05)
