"""Multi-turn rollouts against a scripted policy: the episode's tokens are exactly its conversation's encoding,
only the policy's tokens are marked for the loss, calls are answered by the environment (malformed ones with an
error), turn and token budgets end episodes, and rewards score the final answer."""
import dataclasses
import re

import ml_collections
import numpy as np
import pytest

from alignment.data.chat import encode_chat
from alignment.data.tokenizer import load_tokenizer
from alignment.data.tools import ToolCall, format_call
from alignment.generation.engine import Completions
from alignment.generation.sampling import SamplingParams
from alignment.rewards.registry import from_config
from alignment.rl.multiturn import TurnCompletions, ToolRollouts, model_mask

TOKENIZER = load_tokenizer("embedded")
END = TOKENIZER.token_id("<|im_end|>")


@dataclasses.dataclass
class FakeRequest:
    prompt: list
    max_new: int
    generated: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    sampling_logprobs: list = dataclasses.field(default_factory=list)
    stopped: bool = False
    finished: bool = False


class ScriptedEngine:
    """The engine's submit/step interface; `policy(prompt_text) -> reply text` writes each turn (end token added,
    cut at max_new like the engine's token limit). Log-probs are -0.5 per token so the test can find them."""

    pad_id = 0

    def __init__(self, policy):
        self.policy, self.requests = policy, []

    def submit(self, prompt, max_new, sampling, *, seed=0, sample=0):
        request = FakeRequest(list(prompt), max_new)
        self.requests.append(request)
        return request

    def step(self, params=None):
        for r in self.requests:
            if not r.finished:
                ids = TOKENIZER.encode_continuation(self.policy(TOKENIZER.decode(r.prompt))) + [END]
                r.generated = ids[: r.max_new]
                r.stopped = len(ids) <= r.max_new
                r.logprobs = r.sampling_logprobs = [-0.5] * len(r.generated)
                r.finished = True


def config(max_turns=3, max_new=160):
    return ml_collections.ConfigDict(dict(
        chat_template="chatml", tokenizer="", rewards=dict(math=dict(weight=1.0)), reward_on_error="zero",
        rl=dict(max_new_tokens=max_new, max_prompt_length=64),
        env=dict(name="calculator", max_turns=max_turns, definitions_in_prompt=False)))


RECORD = {"messages": [{"role": "user", "content": "What is 48213 + 97154?"}], "answer": "145367", "prompt_id": "p0"}
CALL = format_call("chatml", ToolCall("calculator", {"expression": "48213 + 97154"}))


def tool_user(prompt: str) -> str:
    """Calls the calculator, then answers with whatever it returned."""
    results = re.findall(r"<tool_response>\n(.*?)\n</tool_response>", prompt, re.DOTALL)
    return f"The answer is {results[-1]}." if results else CALL


def rollout(policy, **kw):
    c = config(**kw)
    rollouts = ToolRollouts(c, TOKENIZER, ScriptedEngine(policy), from_config(c))
    return rollouts.sample([RECORD], 2, SamplingParams(temperature=1.0), seed=0)


def test_episode_is_the_conversation_and_only_policy_tokens_are_trained():
    prompts, out, rewards = rollout(tool_user)
    assert isinstance(out, TurnCompletions) and out.tokens.shape == (2, 160)
    conversation = RECORD["messages"] + [
        {"role": "assistant", "content": "", "tool_calls": [ToolCall("calculator", {"expression": "48213 + 97154"})
                                                            .message_entry()]},
        {"role": "tool", "content": "145367"},
        {"role": "assistant", "content": "The answer is 145367."},
    ]
    encoded = encode_chat(TOKENIZER, conversation, "chatml")
    end = int(np.flatnonzero(encoded.loss_mask)[-1]) + 1  # the policy's last token, its end-of-turn
    n = int(out.lengths[0])
    assert prompts[0] + out.tokens[0, :n].tolist() == encoded.ids[:end].tolist()
    assert out.model_mask[0, :n].tolist() == encoded.loss_mask[len(prompts[0]):end].tolist()
    assert not out.model_mask[0, n:].any()
    assert np.all(out.logprobs[0][out.model_mask[0]] == -0.5) and np.all(out.logprobs[0][~out.model_mask[0]] == 0)
    assert rewards.total.tolist() == [1.0, 1.0]
    assert rewards.components["episode_called"].tolist() == [1.0, 1.0]
    assert rewards.components["episode_turns"].tolist() == [2.0, 2.0]
    assert rewards.components["episode_tool_errors"].tolist() == [0.0, 0.0] and out.stopped.all()


def test_malformed_call_gets_an_error_observation_and_the_episode_goes_on():
    def policy(prompt):
        if "<tool_response>" not in prompt:
            return '<tool_call>\n{"name": "calculator", "arguments": {"expression": }\n</tool_call>'
        if prompt.count("<tool_response>") == 1:
            return CALL
        return tool_user(prompt)

    _, out, rewards = rollout(policy, max_new=300)
    text = TOKENIZER.decode(out.tokens[0, : out.lengths[0]])
    assert "error: malformed tool call: not valid JSON" in text
    assert rewards.components["episode_malformed"].tolist() == [1.0, 1.0]
    assert rewards.components["episode_tool_errors"].tolist() == [1.0, 1.0]
    assert rewards.total.tolist() == [1.0, 1.0] and rewards.components["episode_turns"].tolist() == [3.0, 3.0]


def test_unknown_tool_is_reported_to_the_policy():
    _, out, rewards = rollout(lambda p: tool_user(p).replace('"calculator"', '"calc"'), max_turns=2)
    assert "error: unknown tool 'calc'" in TOKENIZER.decode(out.tokens[0, : out.lengths[0]])
    assert rewards.components["episode_tool_errors"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("kw", [dict(max_turns=1), dict(max_new=80)])
def test_budgets_end_episodes_without_an_answer(kw):
    _, out, rewards = rollout(tool_user, **kw)
    assert rewards.total.tolist() == [0.0, 0.0]  # ended on a call: no final answer
    assert rewards.components["episode_turns"].tolist() == [1.0, 1.0]
    assert (out.lengths <= kw.get("max_new", 160)).all() and out.model_mask.sum() == out.lengths.sum()


def test_no_call_is_a_single_turn_episode():
    _, out, rewards = rollout(lambda p: "The answer is 145367.")
    assert rewards.total.tolist() == [1.0, 1.0] and rewards.components["episode_called"].tolist() == [0.0, 0.0]
    assert out.model_mask.sum() == out.lengths.sum()


def test_model_mask_pads_to_the_row_width_and_single_turn_completions_are_all_policy():
    _, out, _ = rollout(tool_user)
    assert model_mask(out, 200)[:, :160].tolist() == out.model_mask.tolist() and not model_mask(out, 200)[:, 160:].any()
    single = Completions(**{f.name: getattr(out, f.name) for f in dataclasses.fields(Completions)})
    assert model_mask(single, 8).all()


def test_template_without_tool_format_is_refused():
    c = config()
    c.chat_template = "llama2"
    with pytest.raises(ValueError, match="no tool-call format"):
        ToolRollouts(c, TOKENIZER, ScriptedEngine(tool_user), from_config(c))
