"""The PPO stage end to end on CPU: the critic learns, rewards rise on a learnable task, and a run stopped by
SIGTERM resumes exactly."""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from alignment import stages
from alignment.config import load_config_file
from alignment.train.loop import Preempted
from tests import persistent_compilation_cache

PROMPTS = 16  # samples rewarded per RL step (G = 1) and per held-out evaluation (one generation program)


@pytest.fixture
def compilation_cache(tmp_path):
    """The three runs of the stage test compile the same programs; the second and third load them (about 30 s
    each on 2 CPU cores)."""
    yield from persistent_compilation_cache(str(tmp_path / "jax_cache"))


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
