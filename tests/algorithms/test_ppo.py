"""PPO pieces against float64 numpy loops of their formulas."""
import jax.numpy as jnp
import numpy as np
import pytest

from alignment.algorithms import grpo, ppo

RNG = np.random.default_rng(0)
MASK = np.array([[0, 0, 1, 1, 1, 1, 0],  # prompt, completion, padding
                 [0, 1, 1, 1, 1, 1, 1],  # completion up to the last column
                 [0, 0, 0, 0, 0, 0, 0],  # a row without completion tokens
                 [0, 1, 1, 0, 1, 1, 0],  # a hole: skipped, the tokens on either side are consecutive steps
                 [1, 0, 0, 0, 0, 0, 0]], bool)


def numpy_gae(rewards, values, mask, gamma, lam):
    """The textbook backward recursion over each row's masked tokens, in float64."""
    advantages, returns = np.zeros_like(rewards), np.zeros_like(rewards)
    for r in range(len(rewards)):
        tokens = np.flatnonzero(mask[r])
        next_value = next_advantage = 0.0
        for t in tokens[::-1]:
            delta = rewards[r, t] + gamma * next_value - values[r, t]
            next_advantage = advantages[r, t] = delta + gamma * lam * next_advantage
            next_value = values[r, t]
            returns[r, t] = advantages[r, t] + values[r, t]
    return advantages, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0), (0.7, 1.0)])
def test_gae_matches_numpy(gamma, lam):
    rewards, values = RNG.standard_normal(MASK.shape), RNG.standard_normal(MASK.shape)
    got = ppo.gae(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32), MASK, gamma, lam)
    for g, e in zip(got, numpy_gae(rewards, values, MASK, gamma, lam)):
        np.testing.assert_allclose(np.asarray(g, np.float64), e, rtol=1e-5, atol=1e-5)
        assert np.all(np.asarray(g)[~MASK] == 0)


def test_gae_without_discount_is_reward_to_go_minus_values():
    rewards, values = RNG.standard_normal(MASK.shape), RNG.standard_normal(MASK.shape)
    advantages, returns = ppo.gae(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32), MASK,
                                  1.0, 1.0)
    to_go = np.where(MASK, np.cumsum((rewards * MASK)[:, ::-1], axis=1)[:, ::-1], 0.0)
    np.testing.assert_allclose(advantages, to_go - values * MASK, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(returns, to_go, rtol=1e-5, atol=1e-5)


def test_token_rewards_are_the_kl_penalty_plus_the_sequence_reward_at_the_last_token():
    kl, seq_rewards, beta = RNG.random(MASK.shape), RNG.standard_normal(len(MASK)), 0.3
    expected = -beta * kl * MASK
    for r in range(len(MASK)):
        if MASK[r].any():
            expected[r, np.flatnonzero(MASK[r])[-1]] += seq_rewards[r]
    got = ppo.token_rewards(jnp.asarray(seq_rewards, jnp.float32), jnp.asarray(kl, jnp.float32), MASK, beta)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # Without discount or critic, PPO's advantages are GRPO's token-level reward-to-go of the same rewards.
    advantages, _ = ppo.gae(got, jnp.zeros(MASK.shape), MASK, 1.0, 1.0)
    np.testing.assert_allclose(advantages, grpo.token_advantages(jnp.asarray(seq_rewards, jnp.float32),
                                                                 jnp.asarray(kl, jnp.float32), MASK, beta),
                               rtol=1e-5, atol=1e-5)


def test_whiten_over_the_masked_batch():
    advantages = RNG.normal(3.0, 2.0, MASK.shape)
    got = np.asarray(ppo.whiten(jnp.asarray(advantages, jnp.float32), MASK), np.float64)
    real = advantages[MASK]
    np.testing.assert_allclose(got[MASK], (real - real.mean()) / real.std(), rtol=1e-4, atol=1e-5)
    assert np.all(got[~MASK] == 0)


def test_clipped_value_loss_matches_numpy():
    old = RNG.standard_normal(MASK.shape)
    values = old + RNG.normal(0.0, 0.4, MASK.shape)  # some inside the clip range, some outside
    returns, clip = RNG.standard_normal(MASK.shape), 0.2
    expected = 0.5 * np.maximum((values - returns) ** 2, (np.clip(values, old - clip, old + clip) - returns) ** 2)
    per_token, clipped = ppo.value_loss(*(jnp.asarray(x, jnp.float32) for x in (values, old, returns)), clip)
    np.testing.assert_allclose(per_token, expected, rtol=1e-5, atol=1e-6)
    assert 0 < float(clipped[MASK].mean()) < 1
    loss_sum, count = grpo.aggregate(per_token, MASK, "token_mean", MASK.shape[1])
    np.testing.assert_allclose(loss_sum / count, expected[MASK].mean(), rtol=1e-5)
