"""The server's tool calling with the official openai client against a real local server: tools rendered into the
prompt as the template does, calls returned as OpenAI `tool_calls` (plain and streamed), tool results sent back,
tool_choice none / auto / required / a named function, parallel_tool_calls, malformed calls as text, and
one-line 400s for bad tool requests. The engine is scripted (a random model writes no calls): it answers each
prompt's text with a fixed reply, a few tokens per step, through the worker like the real engine."""
import json

import pytest

from alignment.data.chat import encode_chat
from alignment.data.tokenizer import load_tokenizer
from alignment.data.tools import ToolCall, format_call
from alignment.generation.scheduler import Request, Status
from alignment.serve import Service
from tests.test_serve import post, serving

openai = pytest.importorskip("openai")

TOKENIZER = load_tokenizer("embedded")
END = TOKENIZER.token_id("<|im_end|>")
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ASK = [{"role": "user", "content": "Weather in Oslo and Rome?"}]
OSLO, ROME = (format_call("chatml", ToolCall("get_weather", {"city": c})) for c in ("Oslo", "Rome"))


def reply(prompt: str) -> str:
    """The scripted model: what it writes after `prompt` (its text, special tokens included)."""
    if prompt.endswith('"arguments": '):  # a named function was forced
        return '{"city": "Oslo"}}\n</tool_call>'
    if prompt.endswith('{"name": "'):  # a call was required
        return 'get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    if "<tool_response>" in prompt:
        return "Oslo is cold, Rome is warm."
    if "broken" in prompt:
        return '<tool_call>\n{"name": "get_weather", "arguments": {\n</tool_call>'
    if "# Tools" in prompt:
        return f"Checking both.\n{OSLO}\n{ROME}"
    return "No tools needed."


class ScriptedEngine:
    """What `Worker` needs of an engine; each request is answered with `reply`, four tokens per step."""

    max_len = 2048

    def __init__(self):
        self.requests, self.prompts = [], []

    def check_lengths(self, prompt_length, max_new_tokens):
        pass

    def submit(self, prompt, max_new_tokens, sampling, *, seed=0, sample=0, stop_ids=(), stop_strings=(),
               listener=None):
        request = Request(list(prompt), max_new_tokens, sampling, seed, sample, listener=listener)
        request.script = TOKENIZER.encode_continuation(reply(TOKENIZER.decode(prompt))) + [END]
        self.requests.append(request)
        self.prompts.append(list(prompt))
        return request

    def cancel(self, request):
        request.cancelled = True

    def has_work(self):
        return any(not r.finished and not r.cancelled for r in self.requests)

    def step(self, params=None):
        for r in self.requests:
            if r.finished or r.cancelled:
                continue
            r.generated += r.script[len(r.generated):len(r.generated) + 4]
            if len(r.generated) == len(r.script):
                r.status, r.stopped = Status.FINISHED, True
            r.listener(r)


@pytest.fixture(scope="module")
def server():
    engine = ScriptedEngine()
    with serving(Service(engine, TOKENIZER, "chatml", "tiny")) as base:
        yield base, engine, openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def test_calls_come_back_as_tool_calls_and_results_go_back(server):
    base, engine, client = server
    answer = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=200)
    assert engine.prompts[-1] == encode_chat(TOKENIZER, ASK, "chatml", add_generation_prompt=True,
                                             tools=TOOLS).ids.tolist()
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking both."
    calls = choice.message.tool_calls
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("function", "get_weather", {"city": "Oslo"}), ("function", "get_weather", {"city": "Rome"})]
    assert len({c.id for c in calls}) == 2

    follow = ASK + [choice.message.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": c.id, "content": result} for c, result in zip(calls, ("cold", "warm"))]
    final = client.chat.completions.create(model="tiny", messages=follow, tools=TOOLS, max_tokens=200)
    assert final.choices[0].message.content == "Oslo is cold, Rome is warm."
    assert final.choices[0].finish_reason == "stop" and not final.choices[0].message.tool_calls
    expected = ASK + [{"role": "assistant", "content": "Checking both.",
                       "tool_calls": [ToolCall("get_weather", {"city": c}).message_entry() for c in ("Oslo", "Rome")]},
                      {"role": "tool", "content": "cold"}, {"role": "tool", "content": "warm"}]
    assert engine.prompts[-1] == encode_chat(TOKENIZER, expected, "chatml", add_generation_prompt=True,
                                             tools=TOOLS).ids.tolist()


def test_streamed_calls_equal_the_plain_answer(server):
    _, _, client = server
    plain = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=200)
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=200,
                                                 stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    pieces = [d.content for d in deltas if d.content]
    assert "".join(pieces) == plain.choices[0].message.content
    assert not any("<tool" in p for p in pieces)  # text is held back where a call may begin
    calls = [call for d in deltas for call in (d.tool_calls or [])]
    expected = plain.choices[0].message.tool_calls
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (k, t.function.name, json.loads(t.function.arguments)) for k, t in enumerate(expected)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


@pytest.mark.parametrize("tool_choice, parallel, expected", [
    ({"type": "function", "function": {"name": "get_weather"}}, True, [{"city": "Oslo"}]),
    ("required", True, [{"city": "Rome"}]),
    ("auto", False, [{"city": "Oslo"}]),  # parallel_tool_calls false: the first call only
])
def test_tool_choice_and_parallel_calls(server, tool_choice, parallel, expected):
    _, _, client = server
    for stream in (False, True):
        answer = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=tool_choice,
                                                parallel_tool_calls=parallel, max_tokens=200, stream=stream)
        if stream:
            deltas = [c.choices[0].delta for c in answer if c.choices]
            calls = [call for d in deltas for call in (d.tool_calls or [])]
            assert "".join(d.content or "" for d in deltas) == ("Checking both." if tool_choice == "auto" else "")
        else:
            calls = answer.choices[0].message.tool_calls
        assert [json.loads(c.function.arguments) for c in calls] == expected


def test_no_tool_choice_and_malformed_calls_answer_in_text(server):
    _, engine, client = server
    answer = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="none",
                                            max_tokens=200)
    assert answer.choices[0].message.content == "No tools needed." and not answer.choices[0].message.tool_calls
    assert engine.prompts[-1] == encode_chat(TOKENIZER, ASK, "chatml", add_generation_prompt=True).ids.tolist()
    broken = [{"role": "user", "content": "broken"}]
    answer = client.chat.completions.create(model="tiny", messages=broken, tools=TOOLS, max_tokens=200)
    assert answer.choices[0].message.content == reply("# Tools broken") and answer.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("extra, param, words", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "not among the tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "must be"),
    ({"tool_choice": "required"}, "tool_choice", "needs a non-empty 'tools'"),
    ({"tools": [{"type": "function"}]}, "tools", "tools[0]"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls", "true or false"),
])
def test_bad_tool_requests_are_400(server, extra, param, words):
    base, _, _ = server
    status, body = post(f"{base}/v1/chat/completions", json.dumps({"messages": ASK, **extra}).encode())
    assert status == 400 and body["error"]["param"] == param and words in body["error"]["message"], body
