"""The BFCL-style function-calling benchmark: the shipped items are consistent, right answers in either call format
(and parallel calls in any order) score 1, and each kind of mistake scores 0 with its reason; the runner passes
the tools to the generate_fn and caches under them; an endpoint's tool_calls are read back as calls."""
import json

import pytest

from alignment.data.jsonl_cache import JsonlCache
from alignment.data.tools import ToolCall, format_call
from alignment.eval import function_calling as fc
from alignment.eval.benchmarks import BENCHMARKS, Context, data_path
from alignment.eval.runner import evaluate

ITEMS = fc.load(data_path("function_calling", ""), 0, 0)


def first_accepted(expected: dict) -> ToolCall:
    """The call with each argument's first accepted value (optional arguments, listed with "" first, left out)."""
    arguments = expected["arguments"].items()
    return ToolCall(expected["name"], {k: values[0] for k, values in arguments if values[0] != ""})


def right_answer(sample: dict, template: str = "chatml", reverse: bool = False) -> str:
    calls = [first_accepted(e) for e in sample["expected"]]
    if not calls:
        return "I cannot do that with the tools I have."
    return "\n".join(format_call(template, c) for c in (calls[::-1] if reverse else calls))


def test_shipped_items_cover_every_category_and_are_consistent():
    assert {c: sum(s["category"] == c for s in ITEMS) for c in fc.CATEGORIES} == {c: 6 for c in fc.CATEGORIES}
    assert len({s["id"] for s in ITEMS}) == len(ITEMS)
    for sample in ITEMS:  # the first accepted values of every expected call satisfy its tool's schema
        assert not any(fc.check_call(first_accepted(e), e, sample["tools"]) for e in sample["expected"])


def test_right_answers_score_one_in_either_format_and_any_order():
    results = fc.score(ITEMS, [right_answer(s, reverse=True) for s in ITEMS], Context())
    assert [r["reason"] for r in results] == [""] * len(ITEMS)
    single = [s for s in ITEMS if len(s["expected"]) == 1]
    assert all(r["score"] == 1 for r in fc.score(single, [right_answer(s, "llama3") for s in single], Context()))
    summary = fc.aggregate(results, Context())
    assert summary["metrics"] == {"accuracy": 1.0, "call_accuracy": 1.0, "well_formed": 1.0}
    assert summary["categories"] == {c: 1.0 for c in sorted(fc.CATEGORIES)}


WEATHER = next(s for s in ITEMS if s["category"] == "simple" and s["expected"][0]["name"] == "get_weather")
TIMER = next(s for s in ITEMS if s["category"] == "simple" and s["expected"][0]["name"] == "set_timer")
IRRELEVANT = next(s for s in ITEMS if s["category"] == "irrelevance")


def call(name, **arguments):
    return format_call("chatml", ToolCall(name, arguments))


@pytest.mark.parametrize("sample, response, reason", [
    (WEATHER, call("get_weather", city="  lisbon "), ""),  # case and spaces do not matter; unit is optional
    (WEATHER, call("get_weather", city="Lisbon", unit="kelvin"), "unit=\"kelvin\" is not one of"),
    (WEATHER, call("get_forecast", city="Lisbon"), "wrong function: 'get_forecast'"),
    (WEATHER, call("get_weather", town="Lisbon"), "unexpected argument(s) ['town']"),
    (WEATHER, call("get_weather", unit="celsius"), "missing argument 'city'"),
    (WEATHER, call("get_weather", city="Porto"), "city=\"Porto\" is not one of"),
    (WEATHER, call("get_weather", city="Lisbon") * 2, "2 call(s) instead of 1"),
    (WEATHER, "It is sunny in Lisbon.", "0 call(s) instead of 1"),
    (WEATHER, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lisbon"\n</tool_call>', "malformed call"),
    (TIMER, call("set_timer", minutes=12.0), ""),  # 12.0 is the integer 12
    (TIMER, call("set_timer", minutes="12"), "minutes=\"12\" is not one of"),
    (TIMER, call("set_timer", minutes=True), "minutes=true is not one of"),
    (IRRELEVANT, call("get_weather", city="Paris"), "although no tool fits"),
])
def test_mistakes_score_zero_with_their_reason(sample, response, reason):
    (result,) = fc.score([sample], [response], Context())
    assert result["score"] == float(not reason) and reason in result["reason"], result


def test_runner_passes_tools_and_caches_under_them(tmp_path):
    seen = []

    def generate(prompts, max_tokens, tools=None):
        seen.extend(tools)
        by_messages = {json.dumps(s["messages"]): s for s in ITEMS}
        return [right_answer(by_messages[json.dumps(m)]) for m in prompts]

    result = evaluate("function_calling", ITEMS, generate, Context(), JsonlCache(str(tmp_path / "cache.jsonl")),
                      "fake", 64)
    assert result["metrics"]["accuracy"] == 1.0 and seen == [s["tools"] for s in ITEMS]
    other_tools = [dict(s, tools=[{**t, "description": "changed"} for t in s["tools"]]) for s in ITEMS]
    evaluate("function_calling", other_tools, generate, Context(), JsonlCache(str(tmp_path / "cache.jsonl")),
             "fake", 64)
    assert len(seen) == 2 * len(ITEMS)  # other tools: generated again, not served from the cache
    assert BENCHMARKS["function_calling"].shipped


def test_endpoint_tool_calls_are_read_back():
    message = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Cairo"}'}}]}
    assert fc.read_calls(fc.calls_as_text(message)) == ([ToolCall("get_weather", {"city": "Oslo"}),
                                                         ToolCall("get_weather", {"city": "Cairo"})], [])
    broken = dict(message, tool_calls=[{"function": {"name": "f", "arguments": '{"city": '}}])
    assert fc.read_calls(fc.calls_as_text(broken))[1]  # malformed arguments stay malformed
    assert fc.calls_as_text({"content": "Hello"}) == "Hello"


@pytest.mark.parametrize("line, words", [
    ({"id": 1, "category": "simple", "messages": [], "tools": []}, "missing field 'expected'"),
    ({"id": 1, "category": "easy", "messages": [], "tools": [], "expected": []}, "category 'easy'"),
    ({"id": 1, "category": "simple", "messages": [], "tools": WEATHER["tools"], "expected": [{"name": "nope"}]},
     r"expected\[0\]"),
    ({"id": 1, "category": "irrelevance", "messages": [], "tools": WEATHER["tools"],
      "expected": WEATHER["expected"]}, "irrelevance items"),
])
def test_bad_items_name_their_line(tmp_path, line, words):
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=f"{path}:1: .*{words}"):
        fc.load(str(path), 0, 0)


def test_eval_stage_reports_function_calling_from_an_endpoint(tmp_path):
    """The eval stage against a real local server (the scripted engine of tests/test_serve_tools.py: it answers every
    prompt with tools by calling get_weather for Oslo and Rome): tools are sent, tool_calls read back and scored."""
    from alignment import stages
    from alignment.config import load_config_file
    from alignment.serve import Service
    from tests.test_serve import serving
    from tests.test_serve_tools import TOKENIZER, ScriptedEngine

    engine = ScriptedEngine()
    with serving(Service(engine, TOKENIZER, "chatml", "tiny")) as base:
        c = load_config_file("configs/eval.py")
        c.checkpoints, c.benchmarks = f"tiny={base}/v1", "function_calling"
        summary = stages.run("eval", c, str(tmp_path))
    assert len(engine.prompts) == len(ITEMS)  # each item's tools reached the template: the scripted model called
    scored = fc.score(ITEMS, [call("get_weather", city="Oslo") + "\n" + call("get_weather", city="Rome")] * len(ITEMS),
                      Context())
    assert summary["tiny"]["function_calling"] == fc.aggregate(scored, Context())["metrics"]
    assert "function_calling" in (tmp_path / "summary.md").read_text()
