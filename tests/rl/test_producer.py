"""The producer without a model: dynamic sampling, overlong handling, row selection and the checkpoint form of a
rollout, on a stand-in for Rollouts whose completions and rewards are fixed by the prompt and the seed."""
import types

import numpy as np
import pytest

from alignment.data.prompts import PromptStream
from alignment.generation.engine import Completions
from alignment.rewards.registry import RewardResult
from alignment.rl.producer import (Overlong, Producer, has_signal, overlong_penalty, rollout_from_state,
                                   rollout_state, take_rows)

G, MAX_NEW = 4, 8
RL = types.SimpleNamespace(prompts_per_step=3, num_samples=G, max_new_tokens=MAX_NEW, temperature=1.0)


class FakeRollouts:
    """sample(records, G, sampling, seed, params): prompt i's samples get rewards that are all equal when its
    record says `uniform`, else 0, 1, 0, 1; lengths run 5, 6, 7, 8 with the 8-token one unstopped (truncated)."""

    def __init__(self):
        self.seeds = []

    def sample(self, records, num_samples, sampling, seed, params=None):
        self.seeds.append(seed)
        rows = len(records) * num_samples
        lengths = np.tile(np.arange(5, 5 + num_samples), len(records)).astype(np.int32)
        tokens = np.zeros((rows, MAX_NEW), np.int32)
        for r, n in enumerate(lengths):
            tokens[r, :n] = records[r // num_samples]["id"]
        out = Completions(tokens=tokens, lengths=lengths, logprobs=-np.ones((rows, MAX_NEW), np.float32),
                          sampling_logprobs=-np.ones((rows, MAX_NEW), np.float32), stopped=lengths < MAX_NEW,
                          truncated=False, num_samples=num_samples)
        total = np.concatenate([np.full(num_samples, 0.5) if r["uniform"] else np.arange(num_samples) % 2
                                for r in records]).astype(np.float64)
        rewards = RewardResult(total=total, components={"fake": total.copy()}, errors=[], valid=np.ones(rows, bool))
        return [[r["id"]] for r in records], out, rewards


def stream(uniform_ids):
    prompts = {"math": [{"id": i, "uniform": i in uniform_ids} for i in range(1, 13)]}
    return PromptStream(prompts, {"math": 1.0}, seed=0)


def prompt_order():
    """The ids the stream gives, in order."""
    s = stream(set())
    return [r["id"] for r in s.next(12)]


def test_overlong_penalty_is_dapos_soft_punishment():
    lengths = np.arange(0, 11)
    expected = [0.0 if n <= 6 else -0.5 * (n - 6) / 4 for n in lengths]  # L_max 10, cache 4, factor 0.5
    np.testing.assert_allclose(overlong_penalty(lengths, 10, 4, 0.5), expected)


def test_signal_needs_valid_and_unequal_rewards():
    total = np.array([1.0, 1.0, 0.0, 1.0, np.nan, 1.0, 2.0, 2.0])
    valid = ~np.isnan(total)
    assert has_signal(RewardResult(total, {}, [], valid), 2).tolist() == [False, True, False, False]


def test_without_options_the_rollout_is_the_samplers_own():
    rollouts = FakeRollouts()
    producer = Producer(rollouts, stream({1, 2, 3}), RL, seed=3)
    rollout = producer(5, params=None, version=4)
    assert rollouts.seeds == [3 * 7919 + 5] and rollout.version == 4
    assert rollout.in_loss.all() and rollout.prompt_ids == [[i] for i in prompt_order()[:3]]
    assert rollout.stats["truncated_fraction"] == pytest.approx(1 / G)
    assert "dynamic_sampling_draws" not in rollout.stats


def test_dynamic_sampling_keeps_groups_with_signal_and_draws_again():
    order = prompt_order()
    uniform = set(order[:2]) | {order[4]}  # draw 1: two uniform groups; draw 2: one
    rollouts = FakeRollouts()
    rollout = Producer(rollouts, stream(uniform), RL, seed=0, max_draws=3)(0, None, 0)
    expected = [order[2], order[3], order[5]]  # the first three with signal, in order
    assert [p[0] for p in rollout.prompt_ids] == expected
    assert rollout.out.tokens[::G, 0].tolist() == expected and rollout.rewards.total.reshape(-1, G).std(1).min() > 0
    assert rollout.stats["dynamic_sampling_draws"] == 2 and rollout.stats["dynamic_sampling_uniform_groups"] == 3
    assert rollout.stats["dynamic_sampling_unfilled_groups"] == 0 and rollout.in_loss.all()
    assert len(set(rollouts.seeds)) == 2  # each draw samples with its own seeds


def test_dynamic_sampling_fills_a_short_batch_with_uniform_groups_left_out_of_the_loss():
    order = prompt_order()
    rollout = Producer(FakeRollouts(), stream(set(order[1:])), RL, seed=0, max_draws=2)(0, None, 0)
    assert [p[0] for p in rollout.prompt_ids] == [order[0], order[1], order[2]]  # one with signal, two fillers
    assert rollout.in_loss.tolist() == [True] * G + [False] * 2 * G
    assert rollout.stats["dynamic_sampling_unfilled_groups"] == 2 and rollout.stats["dynamic_sampling_draws"] == 2


def test_overlong_mask_and_penalty():
    masked = Producer(FakeRollouts(), stream(set()), RL, seed=0, overlong=Overlong("mask"))(0, None, 0)
    assert masked.in_loss.tolist() == [True, True, True, False] * 3 and masked.stats["overlong_masked"] == 3
    plain = Producer(FakeRollouts(), stream(set()), RL, seed=0)(0, None, 0)
    shaped = Producer(FakeRollouts(), stream(set()), RL, seed=0, overlong=Overlong("penalty", 2, 1.0))(0, None, 0)
    penalty = overlong_penalty(plain.out.lengths, MAX_NEW, 2, 1.0)  # lengths 5..8: 0, 0, -0.5, -1
    np.testing.assert_allclose(penalty[:G], [0, 0, -0.5, -1.0])
    np.testing.assert_allclose(shaped.rewards.total, plain.rewards.total + penalty)
    np.testing.assert_allclose(shaped.rewards.components["overlong"], penalty)
    with pytest.raises(ValueError, match="overlong mode must be one of"):
        Producer(FakeRollouts(), stream(set()), RL, seed=0, overlong=Overlong("clip"))


def test_take_rows_concatenates_completions_and_rewards():
    rollouts = FakeRollouts()
    _, out_a, rewards_a = rollouts.sample([{"id": 1, "uniform": False}], G, None, 0)
    _, out_b, rewards_b = rollouts.sample([{"id": 2, "uniform": True}], G, None, 0)
    out = take_rows([(out_a, np.array([1, 3])), (out_b, np.array([0]))])
    assert out.tokens[:, 0].tolist() == [1, 1, 2] and out.lengths.tolist() == [6, 8, 5] and out.num_samples == G
    rewards = take_rows([(rewards_a, np.array([1, 3])), (rewards_b, np.array([0]))])
    assert rewards.total.tolist() == [1.0, 1.0, 0.5] and rewards.components["fake"].tolist() == [1.0, 1.0, 0.5]


def test_a_rollout_survives_its_checkpoint_form_exactly():
    rollout = Producer(FakeRollouts(), stream(set()), RL, seed=0, overlong=Overlong("penalty", 3, 0.7))(2, None, 1)
    rollout.out.logprobs[0, 0] = np.float32(-1.2345678)
    back = rollout_from_state(rollout_state(rollout))
    assert back.prompt_ids == rollout.prompt_ids and back.version == 1 and back.stats == rollout.stats
    for name in ("tokens", "lengths", "logprobs", "sampling_logprobs", "stopped"):
        a, b = getattr(rollout.out, name), getattr(back.out, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert np.array_equal(back.rewards.total, rollout.rewards.total) and np.array_equal(back.in_loss, rollout.in_loss)
    assert back.rewards.components.keys() == rollout.rewards.components.keys()
