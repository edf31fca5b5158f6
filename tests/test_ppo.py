"""PPO pieces against float64 numpy loops of their formulas, and the stage end to end on CPU: the critic
learns, rewards rise on a learnable task, and a run stopped by SIGTERM resumes exactly."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.experimental.compilation_cache import compilation_cache as cc

from alignment.algorithms import grpo, ppo
from alignment.config import load_config_file
from alignment import stages
from alignment.train.loop import Preempted

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


# --- the stage ---------------------------------------------------------------------------------------


PROMPTS = 16  # samples rewarded per RL step (G = 1) and per held-out evaluation (one generation program)


@pytest.fixture
def compilation_cache(tmp_path):
    """The three runs of the stage test compile the same programs; a persistent compilation cache lets the
    second and third load them instead (about 30 s each on 2 CPU cores)."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    previous = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    cc.reset_cache()  # the cache is otherwise set up once per process, by the first compilation
    yield
    for name, value in previous.items():
        jax.config.update(name, value)
    cc.reset_cache()


def config(steps: int, preempt_at: int = 0):
    c = load_config_file("configs/ppo.py")
    c.warm_start = None
    c.model.num_layers, c.model.hidden_size, c.model.intermediate_size = 2, 64, 128
    c.steps = steps
    c.optimizer.lr, c.optimizer.warmup_steps = 1e-2, 0
    c.critic.optimizer.lr, c.critic.optimizer.warmup_steps = 1e-2, 0
    c.rl.prompts_per_step, c.rl.num_samples, c.rl.max_new_tokens = PROMPTS, 1, 16
    c.rl.ppo_epochs, c.rl.minibatches = 1, 2
    c.rl.eval_every = 0
    c.rl.correct_threshold = 0.5
    c.data.num_embedded_eval = PROMPTS
    c.checkpoint.async_save = False
    c.rewards = {"space_share": {"weight": 1.0, "preempt_at": preempt_at}}
    return c


def train_records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [record for record in map(json.loads, f) if record["split"] == "train"]


def state_at(workdir, step):
    path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state")
    return ocp.StandardCheckpointer().restore(path)


def test_short_run_learns_and_resumes_exactly(tmp_path, space_share_reward, compilation_cache):
    summary = stages.run("ppo", config(12), str(tmp_path / "full"))
    records = train_records(tmp_path / "full")
    rewards, value_losses = [r["reward"] for r in records], [r["value_loss"] for r in records]
    assert np.mean(value_losses[-3:]) < 0.5 * np.mean(value_losses[:3]), value_losses
    assert np.mean(rewards[-3:]) > 1.25 * np.mean(rewards[:3]), rewards
    assert os.path.exists(tmp_path / "full" / "curve.png") and "accuracy_after" in summary

    space_share_reward.calls = 0
    with pytest.raises(Preempted) as stopped:
        stages.run("ppo", config(12, preempt_at=PROMPTS + 5 * PROMPTS + 3), str(tmp_path / "resumed"))
    assert stopped.value.step == 6
    space_share_reward.calls = 0
    stages.run("ppo", config(12), str(tmp_path / "resumed"))
    resumed = train_records(tmp_path / "resumed")
    for key in ("reward", "value_loss"):
        np.testing.assert_allclose([r[key] for r in resumed[-6:]], [r[key] for r in records[-6:]], rtol=1e-6)
    expected, actual = state_at(tmp_path / "full", 12), state_at(tmp_path / "resumed", 12)
    for model in ("policy", "critic"):
        for a, b in zip(jax.tree.leaves(actual[model]["params"]), jax.tree.leaves(expected[model]["params"])):
            np.testing.assert_array_equal(a, b)
