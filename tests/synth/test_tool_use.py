"""The tool-use recipe on the embedded teacher: every kept dialogue replays exactly against the synthetic tools, all
scenario kinds come out, code errors are categorised and become reflect-and-fix turns, flawed steps and answers
are rejected and counted, and the records load as SFT data with their tools. The tools and checks on their own:
unit conversions against known factors, sandbox failures by cause, the scenario shape checks."""
import json

import pytest

from alignment import stages
from alignment.config import config_path, load_config_file
from alignment.data import sft as sft_data
from alignment.data.sources import load_records
from alignment.data.tokenizer import load_tokenizer
from alignment.data.tools import ToolCall, message_tool_calls
from alignment.rewards import sandbox
from alignment.synth import tool_use


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tool_use")
    c = load_config_file(config_path("synth/tool_use"))
    c.tool_use.num_items = 42
    c.teacher.flaw_rate = 0.4
    summary = stages.run("synth", c, str(workdir))
    records = [json.loads(line) for line in open(workdir / "sft.jsonl")]
    return workdir, summary, records


def test_every_kept_dialogue_replays_against_the_tools(run):
    _, summary, records = run
    assert summary["records"] == len(records) > 21 and set(summary["kept_by_kind"]) == set(tool_use.KINDS)
    limits = sandbox.Limits()
    for record in records:
        messages, calls_made = record["messages"], 0
        for i, message in enumerate(messages):
            calls = message_tool_calls(message, record["id"]) if message["role"] == "assistant" else []
            results = [m for m in messages[i + 1:i + 1 + len(calls)]]
            for call, result in zip(calls, results):
                assert result["role"] == "tool" and result["tool_call_id"] == call.id
                if record["category"] == "tool_use/failure" and calls_made == 0:
                    assert result["content"] == tool_use.BUSY
                else:
                    assert tool_use.execute(call, record["tools"], limits).observation == result["content"], record
                calls_made += 1
        assert messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls")


def test_code_errors_become_reflect_and_fix_turns(run):
    _, summary, records = run
    assert summary["reflect_and_fix"] >= 1 and summary["code_errors_by_category"] == {
        "code:NameError": summary["reflect_and_fix"]}
    fixed = [r for r in records if any(m["role"] == "tool" and m["content"].startswith("error: NameError")
                                       for m in r["messages"])]
    assert len(fixed) == summary["reflect_and_fix"]
    for record in fixed:
        roles = [m["role"] for m in record["messages"]]
        assert roles == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
        assert "fixing it" in record["messages"][3]["content"] and not record["messages"][4]["content"].startswith(
            "error")


def test_flaws_are_rejected_and_counted(run):
    _, summary, _ = run
    assert summary["rejected"].get("step_unreadable", 0) > 0 and summary["rejected"].get("wrong_answer", 0) > 0
    assert summary["dropped"] == {"dialogue_rejected": summary["rejected"]["wrong_answer"]}
    assert summary["pairs"] > 0  # a verified step against an unreadable one, for preference data


def test_records_are_sft_data_with_their_tools(run):
    workdir, summary, _ = run
    tokenizer = load_tokenizer("embedded")
    encode = lambda m, **kw: sft_data.chat_example(tokenizer, "chatml", "all_assistant", m, **kw)  # noqa: E731
    records, stats = load_records(str(workdir / "sft.jsonl"), category="tools", encode=encode)
    assert len(records) == summary["records"] and not stats.skipped
    assert all(r["encoded"]["loss_mask"].any() for r in records)


@pytest.mark.parametrize("value, source, target, expected", [
    (1, "lb", "kg", "0.45"), (100, "C", "F", "212.00"), (212, "F", "C", "100.00"), (10, "mi", "km", "16.09"),
    (1, "ft", "m", "0.30"), (16, "oz", "lb", "1.00"),
])
def test_conversions(value, source, target, expected):
    assert tool_use.convert(value, source, target) == expected


def test_tool_errors_and_sandbox_failures_by_cause():
    with pytest.raises(ValueError, match="cannot convert mass"):
        tool_use.convert(1, "kg", "km")
    limits = sandbox.Limits(cpu_seconds=1, wall_seconds=2)
    assert tool_use.run_code("print(6 * 7)", limits) == tool_use.Outcome("42")
    assert tool_use.run_code("print(1 / 0)", limits).failure == "code:ZeroDivisionError"
    assert tool_use.run_code("print(", limits).failure == "code:SyntaxError"
    # CPU limit or wall clock, whichever the machine's load makes come first: the environment's, not the code's
    assert tool_use.run_code("while True: pass", limits).failure in ("environment:timeout", "environment:killed")
    assert tool_use.execute(ToolCall("convert_units", {"value": "1"}), [tool_use.CONVERT], limits).failure == \
        "call:bad_arguments"


def test_shape_checks():
    def dialogue(*calls_per_turn, results=()):
        messages = [{"role": "user", "content": "?"}]
        for calls in calls_per_turn:
            messages.append({"role": "assistant", "content": "", "tool_calls": [c.message_entry() for c in calls]})
        messages += [{"role": "tool", "name": name, "content": text} for name, text in results]
        return messages

    oslo = ToolCall("convert_units", {"value": 1, "from_unit": "kg", "to_unit": "lb"})
    parallel = {"kind": "parallel", "expected": ["2.20", "4.41"]}
    assert tool_use.shape_failures(parallel, dialogue([oslo, oslo]), "2.20 and 4.41") == []
    assert tool_use.shape_failures(parallel, dialogue([oslo], [oslo]), "2.20 and 4.41") == ["not_parallel"]
    assert tool_use.shape_failures(parallel, dialogue([oslo, oslo]), "2.20 and 4.40") == ["wrong_answer"]
    sequential = {"kind": "sequential", "expected": ["7"]}
    calc = ToolCall("calculator", {"expression": "2 * 3.50"})
    assert tool_use.shape_failures(sequential, dialogue([ToolCall("lookup_price", {"item": "notebook"})], [calc],
                                                        results=[("lookup_price", "3.50")]), "It is 7.") == []
    assert tool_use.shape_failures(sequential, dialogue([calc], results=[("lookup_price", "9.99")]), "7") == [
        "ignored_result"]
    irrelevance = {"kind": "irrelevance", "expected": []}
    assert tool_use.shape_failures(irrelevance, dialogue([oslo]), "Hi!") == ["needless_call"]
