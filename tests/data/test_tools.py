"""Tool use in chat data: text- and token-exact against the models' own templates (transformers'
apply_chat_template with tools=), loss masks (calls trained, results not), and reading calls back from text."""
import json

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from alignment.data.chat import ROLES, encode_chat, render_chat_text
from alignment.data.tokenizer import load_tokenizer
from alignment.data.tools import ToolCall, check_tools, format_call, parse_tool_calls
from tests import FIXTURES

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

HF_TEMPLATE = {"chatml": "qwen2_5.jinja", "llama3": "llama3_1.jinja"}
SPECIALS = {"chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                       "<|eot_id|>"]}

TOOLS = [
    {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string", "description": "e.g. 2+3"}},
                       "required": ["expression"]}}},
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city, in °C.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city"]}}},
]


def call(name, arguments, i=0):
    return {"type": "function", "id": f"call_{i}", "function": {"name": name, "arguments": arguments}}


SYSTEM = {"role": "system", "content": "You are a careful assistant."}
CONVERSATION = [
    {"role": "user", "content": "What is 12345 * 6789? Then tell me the weather in Paris."},
    {"role": "assistant", "content": "", "tool_calls": [call("calculator", {"expression": "12345 * 6789"})]},
    {"role": "tool", "tool_call_id": "call_0", "content": "83810205"},
    {"role": "assistant", "content": "The product is 83810205.",
     "tool_calls": [call("get_weather", {"city": "Paris", "days": 1}, 1)]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21, "sky": "clear"}'},
    {"role": "assistant", "content": "12345 * 6789 = 83810205, and Paris is clear at 21 °C."},
]
PARALLEL = [
    {"role": "user", "content": "Weather in Oslo and Rome?"},
    {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Oslo"}),
                                                          call("get_weather", {"city": "Rome"}, 1)]},
    {"role": "tool", "content": "cold"},
    {"role": "tool", "content": "warm"},
    {"role": "assistant", "content": "Oslo is cold, Rome is warm."},
]

CASES = {  # name -> (messages, tools, add_generation_prompt, templates)
    "multi_turn": ([SYSTEM] + CONVERSATION, TOOLS, False, ("chatml", "llama3")),
    "no_system_prompt": (CONVERSATION[:3], TOOLS, True, ("llama3",)),  # Qwen2.5 writes its own default system
    "calls_without_tools": ([SYSTEM] + CONVERSATION, None, False, ("chatml", "llama3")),
    "parallel": ([SYSTEM] + PARALLEL, TOOLS, False, ("chatml",)),
}
CASE_IDS = [(name, t) for name, (*_, templates) in CASES.items() for t in templates]


def _hf_tokenizer(template: str, path):
    """A byte-level BPE tokenizer with the template's specials, as our loader and as transformers see it."""
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS[template],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [json.dumps(TOOLS), json.dumps(CONVERSATION), json.dumps(PARALLEL)]
    hf.train_from_iterator(corpus, trainer)
    hf.save(str(path / "tokenizer.json"))
    ours = load_tokenizer(str(path))
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=hf, bos_token=SPECIALS[template][0],
                                                  eos_token=SPECIALS[template][-1])
    theirs.chat_template = (FIXTURES / "chat_templates" / HF_TEMPLATE[template]).read_text()
    return ours, theirs


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def tokenizer_pair(request, tmp_path_factory):
    return request.param, _hf_tokenizer(request.param, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("case", CASES)
def test_text_and_tokens_match_hf_apply_chat_template(tokenizer_pair, case):
    template, (ours, theirs) = tokenizer_pair
    messages, tools, prompt, templates = CASES[case]
    if template not in templates:
        pytest.skip(f"{case} is not rendered the same way by {template}'s official template")
    text = theirs.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=prompt)
    assert render_chat_text(messages, template, add_generation_prompt=prompt, tools=tools) == text
    encoded = encode_chat(ours, messages, template, add_generation_prompt=prompt, tools=tools)
    assert encoded.ids.tolist() == theirs(text, add_special_tokens=False)["input_ids"]


def _spans(tok, encoded, mask):
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return [tok.decode(encoded.ids[a:b]) for a, b in zip(edges[::2], edges[1::2])]


def test_loss_mask_trains_calls_not_results(tokenizer_pair):
    template, (ours, _) = tokenizer_pair
    encoded = encode_chat(ours, [SYSTEM] + CONVERSATION, template, tools=TOOLS)
    spans = _spans(ours, encoded, encoded.loss_mask)
    if template == "chatml":
        assert spans == [
            '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12345 * 6789"}}\n</tool_call><|im_end|>',
            'The product is 83810205.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
            '"days": 1}}\n</tool_call><|im_end|>',
            "12345 * 6789 = 83810205, and Paris is clear at 21 °C.<|im_end|>",
        ]
    else:  # Llama-3.1 writes only the call in a calling turn (its content is not rendered)
        assert spans == [
            '{"name": "calculator", "parameters": {"expression": "12345 * 6789"}}<|eot_id|>',
            '{"name": "get_weather", "parameters": {"city": "Paris", "days": 1}}<|eot_id|>',
            "12345 * 6789 = 83810205, and Paris is clear at 21 °C.<|eot_id|>",
        ]
    tool_text = ours.decode(encoded.ids[encoded.roles == ROLES.index("tool")])
    assert "83810205" in tool_text and "clear" in tool_text
    assert not encoded.loss_mask[encoded.roles == ROLES.index("tool")].any()
    assert np.all(encoded.roles[encoded.loss_mask] == ROLES.index("assistant"))


def test_string_arguments_are_parsed_and_rendered_as_objects():
    as_dict = render_chat_text(CONVERSATION[:2], "chatml", tools=TOOLS)
    string_call = dict(CONVERSATION[1], tool_calls=[call("calculator", json.dumps({"expression": "12345 * 6789"}))])
    assert render_chat_text([CONVERSATION[0], string_call], "chatml", tools=TOOLS) == as_dict


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_parse_reads_back_what_format_writes(template):
    calls = [ToolCall("get_weather", {"city": "Oslo", "days": 2}), ToolCall("calculator", {"expression": "1+1"})]
    if template == "chatml":
        parsed = parse_tool_calls(template, "Let me check.\n" + "\n".join(format_call(template, c) for c in calls))
        assert parsed.content == "Let me check." and parsed.calls == calls and not parsed.errors
    else:
        parsed = parse_tool_calls(template, format_call(template, calls[0]))
        assert parsed.calls == calls[:1] and parsed.content == "" and not parsed.errors
    plain = parse_tool_calls(template, "The answer is 4.")
    assert plain.calls == [] and plain.errors == [] and plain.content == "The answer is 4."


@pytest.mark.parametrize("template, text, error", [
    ("chatml", '<tool_call>\n{"name": "f", "arguments": {"a": }\n</tool_call>', "not valid JSON"),
    ("chatml", '<tool_call>\n{"arguments": {}}\n</tool_call>', "non-empty string 'name'"),
    ("chatml", '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>', "'arguments' must be a JSON object"),
    ("chatml", '<tool_call>\n{"name": "f", "arguments": {}}', "not closed"),
    ("llama3", '{"name": "f", "parameters": 3}', "'parameters' must be a JSON object"),
    ("llama3", '{"name": "f", "parameters": {', "not valid JSON"),
])
def test_malformed_calls_are_reported(template, text, error):
    parsed = parse_tool_calls(template, text)
    assert parsed.calls == [] and len(parsed.errors) == 1 and error in parsed.errors[0]


@pytest.mark.parametrize("messages, tools, template, words", [
    (PARALLEL, None, "llama3", "one call per assistant turn"),
    (CONVERSATION, None, "llama2", "no tool format"),
    ([{"role": "user", "content": "hi", "tool_calls": [call("f", {})]}], None, "chatml", "only assistant"),
    ([CONVERSATION[0], dict(CONVERSATION[1], tool_calls=[call("f", "{bad")])], None, "chatml", "not valid JSON"),
    (CONVERSATION[:1], [{"type": "function", "function": {}}], "chatml", r"tools\[0\]"),
    ([SYSTEM, CONVERSATION[1]], TOOLS, "llama3", "must be a user turn"),
])
def test_bad_tool_input_raises_one_line(messages, tools, template, words):
    with pytest.raises(ValueError, match=words):
        render_chat_text(messages, template, add_generation_prompt=True, tools=tools)


def test_check_tools_treats_empty_as_none():
    assert check_tools([]) is None and check_tools(TOOLS) is TOOLS


def test_sft_source_records_carry_their_tools(tmp_path):
    from alignment.data import sft as sft_data
    from alignment.data.sources import load_records

    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION, "tools": TOOLS}) + "\n")
    tok = load_tokenizer("embedded")
    encode = lambda m, **kw: sft_data.chat_example(tok, "chatml", "all_assistant", m, **kw)  # noqa: E731
    (record,), _ = load_records(str(path), category="tools", encode=encode)
    expected = encode_chat(tok, CONVERSATION, "chatml", tools=TOOLS)
    assert record["encoded"]["inputs"].tolist() == expected.ids[:-1].tolist()
    assert record["encoded"]["loss_mask"].tolist() == expected.loss_mask[1:].tolist()


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_tool_results_continue_a_rollout_exactly_as_the_conversation_encodes(tokenizer_pair, template):
    from alignment.data.chat import encode_tool_results

    name, (ours, _) = tokenizer_pair
    if name != template:
        pytest.skip("one tokenizer per template")
    prefix = encode_chat(ours, CONVERSATION[:2], template, tools=TOOLS)
    full = encode_chat(ours, CONVERSATION[:3], template, tools=TOOLS, add_generation_prompt=True)
    results = encode_tool_results(ours, template, [CONVERSATION[2]["content"]])
    generated_end = int(np.flatnonzero(prefix.loss_mask)[-1]) + 1  # what the model wrote ends at its end token
    assert full.ids.tolist() == prefix.ids[:generated_end].tolist() + results
