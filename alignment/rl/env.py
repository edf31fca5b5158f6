"""Environments for multi-turn RL: what answers the policy's tool calls during a rollout.

    env = make_env("calculator")          # one fresh environment per episode
    env.reset(record)                     # the prompt record the episode starts from
    result = env.step(ToolCall("calculator", {"expression": "48213 + 97154"}))
    result.observation, result.reward, result.done   # "145367", 0.0, False

`Environment.tools` are the definitions shown to the model (OpenAI function format). A step never raises for
what the model wrote: an unknown tool, arguments that break the tool's JSON schema or a tool's own error come
back as an observation starting with "error:", so the model can read it and try again. `reward` is a per-turn
reward added to the episode's return; `done` ends the episode after this turn's results.

Built in (`ENVIRONMENTS`): `calculator` (exact arithmetic, `alignment.data.tool_task.calculate`) and `python`
(a code interpreter: each call's code runs in the sandbox after the episode's earlier successful cells, whose
output is not repeated, so variables persist across calls).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jsonschema

from alignment.data.tool_task import CALCULATOR, calculate
from alignment.data.tools import ToolCall
from alignment.rewards import sandbox

MAX_OBSERVATION = 2000  # characters of a tool's output shown to the model; the rest is cut and the cut said


@dataclasses.dataclass(frozen=True)
class StepResult:
    observation: str
    reward: float = 0.0
    done: bool = False


class Environment:
    """One episode's tools. Subclasses set `tools` and implement `call`; `reset` clears per-episode state."""

    tools: list[dict] = []

    def reset(self, record: dict) -> None:
        self.record = record

    def call(self, name: str, arguments: dict) -> StepResult:
        """Run a call already checked against its tool's schema; raise ValueError for a tool error."""
        raise NotImplementedError

    def step(self, call: ToolCall) -> StepResult:
        """The observation for one call (errors as text, see the module docstring)."""
        schemas = {t["function"]["name"]: t["function"].get("parameters", {}) for t in self.tools}
        if call.name not in schemas:
            return StepResult(f"error: unknown tool {call.name!r}; available: {', '.join(schemas)}")
        try:
            jsonschema.validate(call.arguments, schemas[call.name])
        except jsonschema.ValidationError as e:
            return StepResult(f"error: bad arguments for {call.name}: {e.message}")
        try:
            result = self.call(call.name, call.arguments)
        except ValueError as e:
            return StepResult(f"error: {e}")
        return dataclasses.replace(result, observation=clip(result.observation))


def clip(text: str) -> str:
    if len(text) <= MAX_OBSERVATION:
        return text
    return text[:MAX_OBSERVATION] + f"\n[output cut: {len(text) - MAX_OBSERVATION} more characters]"


class Calculator(Environment):
    tools = [CALCULATOR]

    def call(self, name: str, arguments: dict) -> StepResult:
        return StepResult(calculate(arguments["expression"]))


PYTHON = {
    "type": "function",
    "function": {
        "name": "python",
        "description": "Run Python code (standard library only, no network) and return what it prints. Variables "
                       "defined by earlier successful calls are still defined.",
        "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"],
                       "additionalProperties": False},
    },
}
# Earlier cells run with their output discarded, so that the new cell's output is all the model sees.
_REPLAY = "import contextlib as _c, io as _io\nwith _c.redirect_stdout(_io.StringIO()):\n    exec({cells!r})\n"


class PythonInterpreter(Environment):
    """A stateful interpreter over the stateless sandbox: cell n runs after cells 1..n-1 that succeeded."""

    tools = [PYTHON]

    def __init__(self, limits: sandbox.Limits = sandbox.Limits(cpu_seconds=5, wall_seconds=10)):
        self.limits, self.cells = limits, []

    def reset(self, record: dict) -> None:
        super().reset(record)
        self.cells = []

    def call(self, name: str, arguments: dict) -> StepResult:
        code = arguments["code"]
        program = (_REPLAY.format(cells="\n".join(self.cells)) if self.cells else "") + code
        result = sandbox.run_python(program, self.limits)
        if not result.passed:
            detail = result.stderr.strip().splitlines()[-1:] or [result.reason]
            return StepResult(f"error: {detail[0]}\n{result.stdout}".rstrip())
        self.cells.append(code)
        return StepResult(result.stdout if result.stdout else "(no output)")


ENVIRONMENTS: dict[str, Callable[[], Environment]] = {"calculator": Calculator, "python": PythonInterpreter}


def make_env(name: str) -> Environment:
    """A fresh environment of a built-in kind."""
    if name not in ENVIRONMENTS:
        raise ValueError(f"unknown environment {name!r}; built in: {', '.join(ENVIRONMENTS)}")
    return ENVIRONMENTS[name]()

