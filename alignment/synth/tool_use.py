"""Recipe 9 (report 4.5): tool use, with code-interpreter data.

Scenarios over synthetic tools that are executed here, so every kept dialogue is consistent (each tool result in a
record is what the tool returned for that call):
  single       one fitting tool among others, one call      ("How much is 3.5 kg in lb?")
  parallel     independent calls in one turn               (two conversions at once)
  sequential   a call needs an earlier result              (a price lookup, then the calculator on it)
  failure      the first call fails (the service is busy)  (the assistant must read the error and retry)
  irrelevance  no tool fits                                (answered without a call)
  variant      a variant of an existing tool, other function and parameter names (tool choice from definitions)
  code         the Python interpreter (the sandbox). Outputs of error-free runs are kept; a run that fails because
               of the code (syntax error, an exception) goes back to the teacher, whose fix becomes a reflect-and-fix
               turn of the record; a failure of the environment (a time, CPU or output limit, the sandbox) drops the
               item, counted by category.
The teacher acts as the assistant: it sees the tool definitions and the conversation so far (results included) and
replies with JSON, {"tool_calls": [{"name", "arguments"}], "content": optional reasoning} or {"answer": text}. A
reply must parse and its calls must name a tool and satisfy its schema (else it is retried, counted by check). The
finished dialogue must have the scenario's shape (parallel: two calls in one turn; sequential: the second call uses
the first result; failure: a retry after the error; irrelevance: no call) and its answer must state the expected
value(s). Records are chat form with `tools`, `tool_calls` and `tool` messages, which SFT renders with the model's
chat template.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import re

import jsonschema
import numpy as np

from alignment.config import Field, positive
from alignment.data.tool_task import CALCULATOR, calculate
from alignment.data.tools import ToolCall
from alignment.rewards import sandbox
from alignment.synth.driver import Result, Session, generate_verified, parse_json_reply, sft_record

NAME = "tool_use"
KINDS = ("single", "parallel", "sequential", "failure", "irrelevance", "variant", "code")
FIELDS = {"num_items": positive(), "attempts": positive(), "max_turns": positive(),
          "sandbox_seconds": Field(low=0, open_low=True)}
BUSY = "error: the service is busy, try again"

AGENT_SYSTEM = (
    "You are an assistant that can call tools. Given the tool definitions and the conversation so far, write the "
    "assistant's next step. Reply with JSON only: either {\"tool_calls\": [{\"name\": tool name, \"arguments\": "
    "{...}}], \"content\": optional short reasoning} to call tools (several independent calls may go in one step), "
    "or {\"answer\": the final reply to the user}. Use tool results exactly as returned; after an error, read it and "
    "fix the call.")


def _function(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required, "additionalProperties": False}}}


# Unit factors to a base unit of their dimension (temperatures are converted by formula).
UNITS = {"kg": ("mass", 1.0), "lb": ("mass", 0.45359237), "g": ("mass", 0.001), "oz": ("mass", 0.028349523125),
         "km": ("length", 1000.0), "mi": ("length", 1609.344), "m": ("length", 1.0), "ft": ("length", 0.3048),
         "C": ("temperature", None), "F": ("temperature", None)}
PRICES = {"notebook": 3.5, "pencil": 0.75, "stapler": 12.0, "backpack": 34.9, "mug": 8.25, "lamp": 27.0,
          "umbrella": 15.5, "scarf": 19.99}


def convert(value: float, source: str, target: str) -> str:
    """`value` in unit `source` expressed in unit `target`, to 2 decimals; ValueError for unknown or mixed units."""
    for unit in (source, target):
        if unit not in UNITS:
            raise ValueError(f"unknown unit {unit!r}; known: {', '.join(UNITS)}")
    if UNITS[source][0] != UNITS[target][0]:
        raise ValueError(f"cannot convert {UNITS[source][0]} ({source}) to {UNITS[target][0]} ({target})")
    if UNITS[source][0] == "temperature":
        result = value if source == target else value * 9 / 5 + 32 if source == "C" else (value - 32) * 5 / 9
    else:
        result = value * UNITS[source][1] / UNITS[target][1]
    return f"{result:.2f}"


def lookup_price(item: str) -> str:
    if item not in PRICES:
        raise ValueError(f"no item named {item!r} in the catalogue")
    return f"{PRICES[item]:.2f}"


NUMBER = {"type": "number"}
TEXT = {"type": "string"}
CONVERT = _function("convert_units", "Convert a quantity between units (mass, length, temperature).",
                    {"value": NUMBER, "from_unit": TEXT, "to_unit": TEXT}, ["value", "from_unit", "to_unit"])
PRICE = _function("lookup_price", "Unit price of a catalogue item, in dollars.", {"item": TEXT}, ["item"])
PYTHON = _function("python", "Run Python code (standard library only) and return what it prints.", {"code": TEXT},
                   ["code"])
# Variants of existing tools: other names, same behaviour (arguments mapped to the original's).
VARIANTS = {
    "unit_convert": (_function("unit_convert", "Change the unit of an amount.",
                               {"amount": NUMBER, "source": TEXT, "target": TEXT}, ["amount", "source", "target"]),
                     "convert_units", {"amount": "value", "source": "from_unit", "target": "to_unit"}),
    "evaluate_math": (_function("evaluate_math", "Compute an arithmetic expression.", {"expr": TEXT}, ["expr"]),
                      "calculator", {"expr": "expression"}),
}


@dataclasses.dataclass(frozen=True)
class Outcome:
    """A call's result as the model sees it, and why it failed: '' (it did not), 'call:...' (the call was wrong),
    'code:<Exception>' (the program failed), 'environment:<status>' (a time or output limit, the sandbox)."""

    observation: str
    failure: str = ""


def run_code(code: str, limits: sandbox.Limits) -> Outcome:
    """The program's output, or its failure categorised: code-caused (the program's own error) or environment."""
    result = sandbox.run_python(code, limits)
    if result.passed:
        return Outcome(result.stdout.strip() or "(no output)")
    if result.status in ("timeout", "output_limit", "error"):
        return Outcome(f"error: {result.reason}", f"environment:{result.status}")
    if result.reason.startswith("failed: killed by"):  # a limit's signal (CPU time, memory), not the code's error
        return Outcome(f"error: {result.reason}", "environment:killed")
    last = (result.stderr.strip().splitlines() or [result.reason])[-1]
    exception = re.match(r"(\w+(?:Error|Exception|Exit|Interrupt))\b", last)
    return Outcome(f"error: {last}", f"code:{exception.group(1) if exception else 'failed'}")


def call_error(call: ToolCall, tools: list[dict]) -> Outcome | None:
    """The error of a call that names no offered tool or breaks its schema; None for a valid call."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    if call.name not in schemas:
        return Outcome(f"error: unknown tool {call.name!r}", "call:unknown_tool")
    try:
        jsonschema.validate(call.arguments, schemas[call.name])
    except jsonschema.ValidationError as e:
        return Outcome(f"error: bad arguments for {call.name}: {e.message}", "call:bad_arguments")
    return None


def execute(call: ToolCall, tools: list[dict], limits: sandbox.Limits) -> Outcome:
    """Runs one call against the synthetic tools (schema-checked first)."""
    error = call_error(call, tools)
    if error is not None:
        return error
    name, arguments = call.name, call.arguments
    if name in VARIANTS:
        _, name, mapping = VARIANTS[name]
        arguments = {mapping[k]: v for k, v in arguments.items()}
    if name == "python":
        return run_code(arguments["code"], limits)
    try:
        if name == "convert_units":
            return Outcome(convert(float(arguments["value"]), arguments["from_unit"], arguments["to_unit"]))
        if name == "lookup_price":
            return Outcome(lookup_price(arguments["item"]))
        return Outcome(calculate(arguments["expression"]))
    except ValueError as e:
        return Outcome(f"error: {e}", "call:tool_error")


# ---- scenarios -------------------------------------------------------------------------------------------------

CODE_TASKS = (  # (request, program computing the expected value) for the code scenarios
    ("the sum of the squares of the integers from 1 to {n}", lambda n: sum(i * i for i in range(1, n + 1))),
    ("how many primes there are below {n}", lambda n: sum(all(p % d for d in range(2, int(p ** 0.5) + 1))
                                                           for p in range(2, n))),
    ("the {n}th Fibonacci number (the 1st and 2nd are 1)", lambda n: _fibonacci(n)),
)


def _fibonacci(n: int) -> int:
    a, b = 1, 1
    for _ in range(n - 2):
        a, b = b, a + b
    return a if n <= 1 else b


def _conversion(rng: np.random.Generator) -> tuple[float, str, str]:
    source = str(rng.choice(list(UNITS)))
    target = str(rng.choice([u for u in UNITS if UNITS[u][0] == UNITS[source][0] and u != source]))
    return float(rng.integers(2, 200)) / 2, source, target


def scenario(kind: str, rng: np.random.Generator, index: int) -> dict:
    """One item: the user's request, the tools offered, the expected value(s) of the answer."""
    item = {"id": f"tool_use-{index}", "kind": kind}
    if kind in ("single", "failure", "variant"):
        value, source, target = _conversion(rng)
        tools = [VARIANTS["unit_convert"][0], VARIANTS["evaluate_math"][0]] if kind == "variant" else [CONVERT,
                                                                                                        CALCULATOR]
        return {**item, "request": f"How much is {value:g} {source} in {target}?", "tools": tools,
                "expected": [convert(value, source, target)]}
    if kind == "parallel":
        (v1, s1, t1), (v2, s2, t2) = _conversion(rng), _conversion(rng)
        return {**item, "request": f"Convert {v1:g} {s1} to {t1} and {v2:g} {s2} to {t2}.", "tools": [CONVERT],
                "expected": [convert(v1, s1, t1), convert(v2, s2, t2)]}
    if kind == "sequential":
        count, name = int(rng.integers(2, 13)), str(rng.choice(list(PRICES)))
        return {**item, "request": f"What do {count} {name}s cost in total?", "tools": [PRICE, CALCULATOR],
                "expected": [calculate(f"{count} * {PRICES[name]:.2f}")]}
    if kind == "irrelevance":
        topic = str(rng.choice(["a birthday card", "a retirement party", "a new neighbour", "a graduation"]))
        return {**item, "request": f"Write a one-line greeting for {topic}.", "tools": [PRICE, CONVERT],
                "expected": []}
    task, solve = CODE_TASKS[int(rng.integers(len(CODE_TASKS)))]
    n = int(rng.integers(10, 60))
    return {**item, "request": f"Using Python, compute {task.format(n=n)}.", "tools": [PYTHON],
            "expected": [str(solve(n))]}


def items(options, seed: int, session: Session) -> tuple[list[dict], dict]:
    rng = np.random.default_rng(seed)
    return [scenario(KINDS[i % len(KINDS)], rng, i) for i in range(options.num_items)], {}


# ---- synthesis -------------------------------------------------------------------------------------------------

def transcript(messages: list[dict]) -> str:
    """The conversation as the teacher reads it."""
    lines = []
    for m in messages:
        if m["role"] == "user":
            lines.append(f"User: {m['content']}")
        elif m["role"] == "tool":
            lines.append(f"Tool result ({m['name']}): {m['content']}")
        else:
            calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in m["tool_calls"]]
            lines.append(f"Assistant called: {json.dumps(calls)}")
    return "\n".join(lines)


def agent_prompt(tools: list[dict], messages: list[dict]) -> list[dict]:
    return [{"role": "system", "content": AGENT_SYSTEM},
            {"role": "user", "content": f"Tools:\n{json.dumps(tools)}\n\nConversation:\n{transcript(messages)}"}]


def reply_failures(reply: str, tools: list[dict]) -> list[str]:
    """Checks of one step's reply: JSON of the agreed form; calls that name a tool and satisfy its schema."""
    step = parse_json_reply(reply)
    if not isinstance(step, dict) or not (isinstance(step.get("answer"), str) or step.get("tool_calls")):
        return ["step_unreadable"]
    if "tool_calls" not in step:
        return [] if step["answer"].strip() else ["empty_answer"]
    calls = step["tool_calls"]
    if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("arguments"), dict)
                                              for c in calls):
        return ["call_malformed"]
    errors = (call_error(ToolCall(str(c.get("name")), c["arguments"]), tools) for c in calls)
    return [e.failure for e in errors if e is not None]


def _numbers(text: str) -> list[float]:
    return [float(x.replace(",", "")) for x in re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)]


def shape_failures(item: dict, messages: list[dict], answer: str) -> list[str]:
    """The scenario's checks on the finished dialogue."""
    turns = [m for m in messages if m["role"] == "assistant" and m.get("tool_calls")]
    calls = [c["function"] for m in turns for c in m["tool_calls"]]
    failures = []
    stated = _numbers(answer)
    if any(not any(abs(x - float(e)) <= 1e-6 * max(1.0, abs(float(e))) for x in stated) for e in item["expected"]):
        failures.append("wrong_answer")
    kind = item["kind"]
    if kind == "irrelevance" and calls:
        failures.append("needless_call")
    if kind != "irrelevance" and not calls:
        failures.append("no_call")
    if kind == "parallel" and not any(len(m["tool_calls"]) >= 2 for m in turns):
        failures.append("not_parallel")
    if kind == "sequential":
        prices = [m["content"] for m in messages if m["role"] == "tool" and m["name"] == "lookup_price"]
        later = [json.dumps(c["arguments"]) for c in calls if c["name"] == "calculator"]
        if not prices or not any(prices[0] in expression for expression in later):
            failures.append("ignored_result")
    return failures


def synthesize(item: dict, session: Session, options) -> Result:
    result = Result(item["id"], facts={"kind": item["kind"]})
    limits = sandbox.Limits(cpu_seconds=options.sandbox_seconds, wall_seconds=2 * options.sandbox_seconds)
    messages = [{"role": "user", "content": item["request"]}]
    calls_made, code_errors = 0, []
    for turn in range(options.max_turns):
        reply = generate_verified(session, result, agent_prompt(item["tools"], messages),
                                  lambda r: reply_failures(r, item["tools"]), options.attempts, (item["id"], turn))
        if reply is None:
            return result.drop("step_rejected")
        step = parse_json_reply(reply)
        if "tool_calls" not in step:
            failures = shape_failures(item, messages, step["answer"])
            if failures:
                result.reject(failures)
                return result.drop("dialogue_rejected")
            messages.append({"role": "assistant", "content": step["answer"].strip()})
            result.facts.update(turns=turn + 1, reflect_fix=bool(code_errors), code_errors=code_errors)
            result.records.append(sft_record(item["id"], NAME, f"tool_use/{item['kind']}", messages,
                                             tools=item["tools"]))
            return result
        calls = [ToolCall(c["name"], c["arguments"], id=f"call_{turn}_{k}") for k, c in enumerate(step["tool_calls"])]
        content = step.get("content") if isinstance(step.get("content"), str) else ""
        messages.append({"role": "assistant", "content": content.strip(),
                         "tool_calls": [c.message_entry() for c in calls]})
        for call in calls:
            # The failure scenario's service is busy on the first call: the assistant has to retry.
            outcome = Outcome(BUSY, "injected") if item["kind"] == "failure" and calls_made == 0 else \
                execute(call, item["tools"], limits)
            calls_made += 1
            if outcome.failure.startswith("environment:"):
                return result.drop(outcome.failure)
            if outcome.failure.startswith("code:"):
                code_errors.append(outcome.failure)  # the teacher sees the error and fixes the code next turn
            messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name,
                             "content": outcome.observation})
    result.reject(["no_answer"])
    return result.drop("dialogue_rejected")


def finish(results: list[Result], options, seed: int, workdir: str) -> dict:
    kept = [r for r in results if r.records]
    errors = collections.Counter(e for r in results for e in r.facts.get("code_errors", []))
    return {"kept_by_kind": dict(sorted(collections.Counter(r.facts["kind"] for r in kept).items())),
            "reflect_and_fix": sum(bool(r.facts.get("reflect_fix")) for r in kept),
            "code_errors_by_category": dict(sorted(errors.items()))}


# ---- the embedded teacher's stand-in -------------------------------------------------------------------------

_PROGRAMS = {  # the stand-in's programs for the code requests, by the request's start
    "the sum of the squares": "print(sum(i * i for i in range(1, {n} + 1)))",
    "how many primes": "print(sum(all(p % d for d in range(2, int(p ** 0.5) + 1)) for p in range(2, {n})))",
    "the ": "a, b = 1, 1\nfor _ in range({n} - 2):\n    a, b = b, a + b\nprint(b)",
}


def _call(name: str, **arguments) -> dict:
    return {"name": name, "arguments": arguments}


def stand_in(content: str, flawed: bool, draw: float) -> str:
    """The rule-based teacher's next step for an `agent_prompt` (it knows the scenario templates). Flawed steps
    (`flawed`; `draw` in [0, 1) picks how) are unreadable or give a wrong final answer; a flawed first program has a
    typo, which the stand-in fixes once it sees the error (a reflect-and-fix turn, not a rejection)."""
    head, _, conversation = content.partition("\n\nConversation:\n")
    tools = {t["function"]["name"]: list(t["function"]["parameters"]["properties"])
             for t in json.loads(head.removeprefix("Tools:\n"))}
    request = conversation.splitlines()[0].removeprefix("User: ")
    results = re.findall(r"^Tool result \((\w+)\): (.*)$", conversation, re.MULTILINE)
    good = [text for _, text in results if not text.startswith("error:")]
    failed = bool(results) and results[-1][1].startswith("error:")
    if flawed and draw < 0.3:
        return "Let me think about which tool fits."  # not the agreed JSON: retried
    wrong = flawed and draw >= 0.6  # the final answer states a wrong value

    def number(text: str) -> str:
        return f"{float(text) + 1:.2f}" if wrong else text

    if match := re.fullmatch(r"How much is ([\d.]+) (\w+) in (\w+)\?", request):
        value, source, target = match.groups()
        name = next(n for n in tools if n in ("convert_units", "unit_convert"))
        if not good:
            return json.dumps({"tool_calls": [_call(name, **dict(zip(tools[name], (float(value), source, target))))],
                               "content": "The last call failed; trying again." if failed else ""})
        return json.dumps({"answer": f"{value} {source} is {number(good[-1])} {target}."})
    if match := re.fullmatch(r"Convert ([\d.]+) (\w+) to (\w+) and ([\d.]+) (\w+) to (\w+)\.", request):
        v1, s1, t1, v2, s2, t2 = match.groups()
        if len(good) < 2:
            return json.dumps({"tool_calls": [_call("convert_units", value=float(v1), from_unit=s1, to_unit=t1),
                                              _call("convert_units", value=float(v2), from_unit=s2, to_unit=t2)]})
        return json.dumps({"answer": f"{v1} {s1} is {number(good[0])} {t1}, and {v2} {s2} is {good[1]} {t2}."})
    if match := re.fullmatch(r"What do (\d+) (\w+)s cost in total\?", request):
        count, item = match.groups()
        if not good:
            return json.dumps({"tool_calls": [_call("lookup_price", item=item)]})
        if len(good) == 1:
            return json.dumps({"tool_calls": [_call("calculator", expression=f"{count} * {good[0]}")],
                               "content": f"One {item} costs {good[0]} dollars."})
        return json.dumps({"answer": f"{count} {item}s cost {number(good[1])} dollars in total."})
    if match := re.fullmatch(r"Using Python, compute (.*)\.", request):
        task = match.group(1)
        n = re.search(r"(\d+)", task).group(1)
        program = next(p for start, p in _PROGRAMS.items() if task.startswith(start)).format(n=n)
        if good:
            return json.dumps({"answer": f"The result is {number(good[-1])}."})
        if failed:
            return json.dumps({"tool_calls": [_call("python", code=program)],
                               "content": f"The program failed ({results[-1][1].removeprefix('error: ')}): a typo; "
                                          "fixing it."})
        if flawed:  # a typo in the first program: the interpreter's error starts a reflect-and-fix turn
            program = program.replace("print(", "prnt(", 1)
        return json.dumps({"tool_calls": [_call("python", code=program)]})
    return json.dumps({"answer": "Wishing you every happiness today and in the year ahead!"})
