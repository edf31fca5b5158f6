"""GRPO end to end on CPU: rewards rise on a learnable task, the profiler switch writes a trace, and a run
stopped by SIGTERM resumes exactly, synchronous or pipelined (rollouts in flight checkpointed); the split
rollout mesh samples what the shared mesh samples; the sampler/trainer mismatch is float32 rounding with one
precision and reported with bf16 rollouts; the sampling and loss options run and report their counts."""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from alignment.config import load_config_file
from alignment import stages
from alignment.train.loop import Preempted
from tests import persistent_compilation_cache


@pytest.fixture
def compilation_cache(tmp_path):
    """The runs of one test compile the same programs; later runs load them."""
    yield from persistent_compilation_cache(str(tmp_path / "jax_cache"))


def config(steps: int, preempt_at: int = 0, profile: bool = False, **rl):
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
    c.rl.update(rl)
    return c


def train_records(workdir):
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r for r in records if r["split"] == "train"]


def rewards(workdir):
    return [r["reward"] for r in train_records(workdir)]


def params_at(workdir, step):
    path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state")
    return ocp.StandardCheckpointer().restore(path)["params"]


def test_short_run_raises_reward_and_resumes_exactly(tmp_path, space_share_reward):
    summary = stages.run("grpo", config(12, profile=True), str(tmp_path / "full"))
    curve = rewards(tmp_path / "full")
    assert np.mean(curve[-3:]) > 1.25 * np.mean(curve[:3]), curve  # the space share rises by about half
    assert os.path.exists(tmp_path / "full" / "curve.png") and "accuracy_after" in summary
    # Synchronous, one precision: the sampler's log-probs are the trainer's up to float32 rounding (two programs,
    # the engine's paged decode and the trainer's forward, so not always to the bit).
    for record in train_records(tmp_path / "full"):
        assert record["staleness"] == 0 and record["mismatch_abs_log_ratio_max"] < 1e-5, record
        assert 0 <= record["mismatch_kl"] < 1e-10, record
    assert summary["staleness"] == {"0": 12} and summary["pipeline"]["overlap_s"] == 0
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


def in_flight(workdir, step):
    """The rollouts the checkpoint of `step` holds for later steps (Orbax keeps the JSON item as `metadata`)."""
    with open(os.path.join(workdir, "checkpoints", str(step), "data", "metadata")) as f:
        return json.load(f)["in_flight"]


def test_pipelined_run_resumes_exactly_and_the_split_mesh_samples_as_the_shared_one(tmp_path, space_share_reward,
                                                                                   compilation_cache):
    pipelined = dict(max_staleness=1, is_correction="tis", is_high=1.5)
    summary = stages.run("grpo", config(5, **pipelined), str(tmp_path / "full"))
    records = train_records(tmp_path / "full")
    assert [r["staleness"] for r in records] == [0, 1, 1, 1, 1]  # step s samples with the parameters of s - 1
    assert summary["staleness"] == {"0": 1, "1": 4} and summary["pipeline"]["max_staleness"] == 1
    # One update behind, the sampler is measurably off the trainer, and TIS truncates some weights.
    assert all(r["mismatch_kl"] > 1e-6 for r in records[1:]) and any(r["is_truncated_fraction"] > 0 for r in records)

    space_share_reward.calls = 0
    with pytest.raises(Preempted) as stopped:
        # 8 held-out samples, then 32 per rollout: SIGTERM while the producer rewards rollout 2, which it makes
        # while the trainer updates step 1 (or, when the trainer is quick, 2).
        stages.run("grpo", config(5, preempt_at=8 + 2 * 32 + 3, **pipelined), str(tmp_path / "resumed"))
    assert stopped.value.step in (2, 3)
    assert len(in_flight(tmp_path / "resumed", stopped.value.step)) == 1  # made from the version before, kept
    space_share_reward.calls = 0
    stages.run("grpo", config(5, **pipelined), str(tmp_path / "resumed"))
    assert rewards(tmp_path / "resumed")[-(5 - stopped.value.step):] == rewards(tmp_path / "full")[stopped.value.step:]
    expected, actual = params_at(tmp_path / "full", 5), params_at(tmp_path / "resumed", 5)
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)

    # The first 4 of the 8 devices sample, the other 4 train; parameters are copied over after every update. The
    # same versions sample the same tokens (equal rewards); the updates differ from the 8-device ones only in
    # the order of the gradient's sums.
    summary = stages.run("grpo", config(3, rollout_devices=4, **pipelined), str(tmp_path / "split"))
    np.testing.assert_allclose(rewards(tmp_path / "split"), rewards(tmp_path / "full")[:3], rtol=1e-6)
    assert [r["staleness"] for r in train_records(tmp_path / "split")] == [0, 1, 1]
    pipeline = summary["pipeline"]
    assert pipeline["producer_busy_s"] > 0 and pipeline["trainer_busy_s"] > 0 and 0 <= pipeline["overlap_fraction"] < 1


def test_bf16_rollouts_and_the_sampling_and_loss_options(tmp_path, space_share_reward):
    """bf16 sampling, fp32 training: the mismatch is reported (well above float32 rounding) and masked IS per
    sequence drops some; dynamic sampling, the overlong penalty and CISPO run and report their counts."""
    c = config(2, rollout_dtype="bfloat16", is_correction="mis", is_level="sequence", is_low=0.999, is_high=1.001,
               dynamic_sampling=True, dynamic_sampling_max_draws=2, overlong="penalty", overlong_buffer=4,
               policy_loss="cispo", clip_high=4.0)
    stages.run("grpo", c, str(tmp_path))
    for record in train_records(tmp_path):
        assert record["mismatch_abs_log_ratio_max"] > 1e-4 and record["mismatch_kl"] > 1e-9, record
        assert 0 < record["is_masked_fraction"] < 1 and record["is_truncated_fraction"] == 0, record
        assert record["dynamic_sampling_draws"] in (1, 2) and "dynamic_sampling_uniform_groups" in record
        assert record["reward_overlong"] <= 0 and 0 <= record["truncated_fraction"] <= 1
        assert np.isfinite(record["loss"])


@pytest.mark.parametrize("key, value, message", [
    ("is_low", 2.0, "rl.is_low=2.0 must be below rl.is_high=2.0"),
    ("rollout_devices", 8, "rl.rollout_devices=8 leaves no training device: 8 devices in all"),
    ("overlong_buffer", 17, "rl.overlong_buffer=17 exceeds rl.max_new_tokens=16"),
    ("policy_loss", "gpso", "config.rl.policy_loss='gpso' is not one of .* Did you mean 'gspo'"),
])
def test_off_policy_settings_are_checked_before_any_work(tmp_path, key, value, message):
    c = config(1, overlong="penalty")
    c.rl[key] = value
    with pytest.raises(ValueError, match=message):
        stages.run("grpo", c, str(tmp_path))
    assert not os.listdir(tmp_path)
