"""Function-calling evaluation in the style of BFCL's AST checks: the calls a model writes are parsed and compared
to the expected ones by function name and argument values, never by string equality of the text.

Categories: `simple` (one tool, one call), `multiple` (several tools, the right one must be chosen), `parallel`
(several calls in one turn, in any order), `irrelevance` (no tool fits: the right answer calls nothing).

An item (JSONL, one per line; the shipped set is `alignment/eval/data/function_calling/items.jsonl`):
    {"id", "category", "messages": [...], "tools": [OpenAI function definitions],
     "expected": [{"name": "get_weather", "arguments": {"city": ["Paris", "Paris, France"], "unit": ["", "celsius"]}}]}
Each expected argument lists its accepted values; "" among them means the argument may be left out (an optional
one). A call matches when its name is the expected one, it has no argument outside the expected ones, every
required argument is present, each value is accepted (strings compared without case and surrounding spaces,
1 == 1.0 but not True; lists and objects element by element) and the arguments satisfy the tool's JSON schema.

Responses are text: a model's own call format (chatml `<tool_call>` blocks or a Llama-3.1 JSON turn), which is
also what an endpoint's `tool_calls` are turned into (`calls_as_text`).
"""
from __future__ import annotations

import collections
import itertools
import json

import jsonschema
import numpy as np

from alignment.data.sources import read_jsonl
from alignment.data.tools import ToolCall, check_tools, format_call, parse_tool_calls

CATEGORIES = ("simple", "multiple", "parallel", "irrelevance")
SOURCE = ("JSONL of {id, category (simple | multiple | parallel | irrelevance), messages, tools, expected: [{name, "
          "arguments: {name: [accepted values]}}]}; the shipped set is read when no path is given")


def read_calls(text: str) -> tuple[list[ToolCall], list[str]]:
    """(calls, malformed-call errors) in `text`, in chatml's format or else Llama-3.1's."""
    parsed = parse_tool_calls("chatml", text)
    if parsed.calls or parsed.errors:
        return parsed.calls, parsed.errors
    parsed = parse_tool_calls("llama3", text)
    return parsed.calls, parsed.errors


def calls_as_text(message: dict) -> str:
    """An endpoint's answer (content and OpenAI tool_calls) as text `read_calls` reads."""
    calls = []
    for entry in message.get("tool_calls") or []:
        arguments = entry["function"].get("arguments") or "{}"
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError:
            return f"{message.get('content') or ''}\n<tool_call>\n{arguments}\n</tool_call>"  # scored as malformed
        calls.append(format_call("chatml", ToolCall(entry["function"]["name"], arguments)))
    return "\n".join([message.get("content") or ""] + calls).strip()


def _normal(value):
    if isinstance(value, str):
        return value.strip().lower()
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    return value


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):  # True is not 1
        return type(a) is type(b) and a == b
    return _normal(a) == _normal(b)


def check_call(call: ToolCall, expected: dict, tools: list[dict]) -> str:
    """'' when `call` matches `expected`, else the reason it does not."""
    if call.name != expected["name"]:
        return f"wrong function: {call.name!r} instead of {expected['name']!r}"
    accepted = expected["arguments"]
    extra = sorted(set(call.arguments) - set(accepted))
    if extra:
        return f"{call.name}: unexpected argument(s) {extra}"
    for name, values in accepted.items():
        if name not in call.arguments:
            if "" not in values:
                return f"{call.name}: missing argument {name!r}"
        elif not any(_same(call.arguments[name], v) for v in values if v != ""):
            return f"{call.name}: {name}={json.dumps(call.arguments[name])} is not one of {json.dumps(values)}"
    schemas = {t["function"]["name"]: t["function"].get("parameters", {}) for t in tools}
    try:
        jsonschema.validate(call.arguments, schemas.get(call.name, {}))
    except jsonschema.ValidationError as e:
        return f"{call.name}: arguments break the schema ({e.message})"
    return ""


def check_calls(calls: list[ToolCall], expected: list[dict], tools: list[dict]) -> str:
    """'' when the calls match the expected ones one to one, in any order; else why not."""
    if len(calls) != len(expected):
        return f"{len(calls)} call(s) instead of {len(expected)}"
    if len(calls) <= 6:  # few calls: try every pairing (BFCL's parallel check is order-free)
        for order in itertools.permutations(range(len(calls))):
            if not any(check_call(calls[i], e, tools) for i, e in zip(order, expected)):
                return ""
    return "; ".join(filter(None, (check_call(c, e, tools) for c, e in zip(calls, expected)))) or "no pairing matches"


def load(path: str, limit: int, seed: int) -> list[dict]:
    """Items of a JSONL file (see the module docstring); a bad item is an error naming its line and field."""
    del seed
    samples = []
    for number, item in read_jsonl(path):
        where = f"{path}:{number}"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a JSON object")
        for field in ("id", "category", "messages", "tools", "expected"):
            if field not in item:
                raise ValueError(f"{where}: missing field {field!r}")
        if item["category"] not in CATEGORIES:
            raise ValueError(f"{where}: category {item['category']!r} is not one of {CATEGORIES}")
        tools = check_tools(item["tools"], f"{where}: tools")
        names = {t["function"]["name"] for t in tools or []}
        for k, e in enumerate(item["expected"]):
            if not isinstance(e, dict) or e.get("name") not in names or not isinstance(e.get("arguments"), dict) or \
                    not all(isinstance(v, list) and v for v in e["arguments"].values()):
                raise ValueError(f"{where}: expected[{k}] needs a name among the tools and arguments "
                                 "{name: [accepted values]}")
        if (item["category"] == "irrelevance") != (not item["expected"]):
            raise ValueError(f"{where}: irrelevance items, and only they, expect no call")
        samples.append({"id": str(item["id"]), "category": item["category"], "messages": item["messages"],
                        "tools": tools, "expected": item["expected"]})
        if limit and len(samples) >= limit:
            break
    return samples


def score(samples: list[dict], responses: list[str], ctx) -> list[dict]:
    results = []
    for sample, response in zip(samples, responses):
        calls, errors = read_calls(response)
        if errors:
            reason = f"malformed call: {errors[0]}"
        elif sample["category"] == "irrelevance":
            reason = f"called {calls[0].name} although no tool fits" if calls else ""
        else:
            reason = check_calls(calls, sample["expected"], sample["tools"])
        results.append({"id": sample["id"], "category": sample["category"], "score": float(not reason),
                        "reason": reason, "well_formed": not errors})
    return results


def aggregate(results: list[dict], ctx) -> dict:
    by_category = collections.defaultdict(list)
    for r in results:
        by_category[r["category"]].append(r["score"])
    calling = [r["score"] for r in results if r["category"] != "irrelevance"]
    return {"metrics": {"accuracy": float(np.mean([r["score"] for r in results])),
                        "call_accuracy": float(np.mean(calling)) if calling else float("nan"),
                        "well_formed": float(np.mean([r["well_formed"] for r in results]))},
            "categories": {c: float(np.mean(v)) for c, v in sorted(by_category.items())},
            "counts": {"malformed": sum(not r["well_formed"] for r in results)}}
