"""GRPO over multi-turn tool episodes end to end on CPU (the tiny model at random init writes no calls, so the
turn parser is made to read a calculator call in every first turn): episodes reach the environment, the step and
the held-out evaluation report the episode statistics, and a pipelined rollout in flight survives a checkpoint."""
import json
import os

import numpy as np

from alignment import stages
from alignment.config import load_config_file
from alignment.data.tools import ParsedTurn, ToolCall
from alignment.rl import multiturn
from alignment.stages import grpo
from alignment.rl.producer import Rollout, rollout_from_state, rollout_state
from alignment.rewards.registry import RewardResult


def config():
    c = load_config_file("configs/grpo_tools.py")
    c.warm_start = None
    c.model.num_layers, c.model.hidden_size, c.model.intermediate_size = 2, 64, 128
    c.steps = 1
    c.rl.prompts_per_step, c.rl.num_samples, c.rl.max_new_tokens = 4, 2, 48  # 8 rows: one per simulated device
    c.rl.eval_every = 0
    c.data.num_embedded_eval = 4
    c.checkpoint.async_save = False
    c.env.max_turns = 2
    return c


def test_tool_episodes_train_and_report(tmp_path, monkeypatch):
    def every_turn_calls(template, text):  # the second turn is the last (max_turns 2)
        return ParsedTurn("", [ToolCall("calculator", {"expression": "2 + 3"})], [])

    monkeypatch.setattr(multiturn, "parse_tool_calls", every_turn_calls)
    # Every token ends a turn, so each turn is one token long and ends "stopped", as a finished call does.
    monkeypatch.setattr(grpo, "stop_token_ids", lambda tokenizer, template: list(range(tokenizer.vocab_size)))
    summary = stages.run("grpo", config(), str(tmp_path))
    records = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert len(train) == 1 and all(r["reward_episode_called"] == 1.0 for r in train)
    assert all(r["reward_episode_turns"] == 2.0 for r in train)  # the call was answered, then a second turn
    assert evals and all(r["episode_called/tools"] == 1.0 for r in evals)
    assert summary["accuracy_before"] == summary["accuracy_after"] == 0.0  # every episode ends on a call


def test_turn_completions_survive_a_checkpoint():
    out = multiturn.TurnCompletions(
        tokens=np.arange(6, dtype=np.int32).reshape(2, 3), lengths=np.array([3, 2], np.int32),
        logprobs=np.zeros((2, 3), np.float32), sampling_logprobs=np.zeros((2, 3), np.float32),
        stopped=np.array([True, False]), truncated=False, num_samples=2,
        model_mask=np.array([[True, False, True], [True, True, False]]))
    rewards = RewardResult(np.zeros(2), {"episode_called": np.ones(2)}, [], np.ones(2, bool))
    rollout = Rollout([[1, 2]], out, rewards, 0, np.ones(2, bool))
    restored = rollout_from_state(json.loads(json.dumps(rollout_state(rollout))))
    assert isinstance(restored.out, multiturn.TurnCompletions)
    np.testing.assert_array_equal(restored.out.model_mask, out.model_mask)
