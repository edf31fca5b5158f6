"""GRPO end to end on CPU: rewards rise on a learnable task, the profiler switch writes a trace, and a run
stopped by SIGTERM resumes exactly."""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from alignment.config import load_config_file
from alignment import stages
from alignment.train.loop import Preempted


def config(steps: int, preempt_at: int = 0, profile: bool = False):
    c = load_config_file("configs/grpo.py")
    c.warm_start = None
    c.model.num_layers, c.model.hidden_size, c.model.intermediate_size = 2, 64, 128
    c.steps = steps
    c.optimizer.lr, c.optimizer.warmup_steps = 1e-2, 0
    c.rl.prompts_per_step, c.rl.num_samples, c.rl.max_new_tokens = 4, 8, 16
    c.rl.eval_every = 0
    c.rl.correct_threshold = 0.5
    c.data.num_embedded_eval = 8
    c.checkpoint.async_save = False
    c.rewards = {"space_share": {"weight": 1.0, "preempt_at": preempt_at}}
    c.profile.update(dict(enabled=profile, start_step=2, num_steps=1))
    return c


def rewards(workdir):
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r["reward"] for r in records if r["split"] == "train"]


def params_at(workdir, step):
    path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state")
    return ocp.StandardCheckpointer().restore(path)["params"]


def test_short_run_raises_reward_and_resumes_exactly(tmp_path, space_share_reward):
    summary = stages.run("grpo", config(12, profile=True), str(tmp_path / "full"))
    curve = rewards(tmp_path / "full")
    assert np.mean(curve[-3:]) > 1.25 * np.mean(curve[:3]), curve  # the space share rises by about half
    assert os.path.exists(tmp_path / "full" / "curve.png") and "accuracy_after" in summary
    assert list((tmp_path / "full" / "profile").rglob("*.xplane.pb")), "no profiler trace written"

    space_share_reward.calls = 0
    with pytest.raises(Preempted) as stopped:
        # 4 prompts x 8 samples are scored per step, plus 8 held-out ones before RL: stop during step 6.
        stages.run("grpo", config(12, preempt_at=8 + 5 * 32 + 3), str(tmp_path / "resumed"))
    assert stopped.value.step == 6
    space_share_reward.calls = 0
    stages.run("grpo", config(12), str(tmp_path / "resumed"))
    np.testing.assert_allclose(rewards(tmp_path / "resumed")[-6:], curve[-6:], rtol=1e-6)
    expected, actual = params_at(tmp_path / "full", 12), params_at(tmp_path / "resumed", 12)
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)


def test_importance_ratio_outside_k3_is_refused_before_any_work(tmp_path):
    c = config(1)
    c.rl.kl_importance_ratio = True  # with the default kl_mode, token_reward
    with pytest.raises(ValueError, match=r"rl.kl_importance_ratio .* needs rl.kl_mode 'k3', got 'token_reward'"):
        stages.run("grpo", c, str(tmp_path))
    assert not os.listdir(tmp_path)
