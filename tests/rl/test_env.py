"""Environments: the calculator against Python's exact arithmetic, hostile expressions refused with a reason,
schema checks and tool errors as observations, and the sandboxed interpreter's state across calls."""
import numpy as np
import pytest

from alignment.data.tool_task import calculate, tool_arithmetic_dataset
from alignment.data.tools import ToolCall
from alignment.rl.env import MAX_OBSERVATION, StepResult, make_env


def test_calculator_matches_python_integer_arithmetic():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a, b, c = (int(x) for x in rng.integers(-10**9, 10**9, size=3))
        expression = f"({a} + {b}) * {c} - {a} // {c or 1} % 7"
        assert calculate(expression) == str((a + b) * c - a // (c or 1) % 7)
    assert calculate("2 ** 10 / 4") == "256"  # true division: a float, written to 12 significant digits
    assert calculate("1 / 3") == f"{1 / 3:.12g}" and calculate("-(3)") == "-3"


@pytest.mark.parametrize("expression, reason", [
    ("__import__('os').system('id')", "unsupported syntax: Call"),
    ("x + 1", "unsupported syntax: Name"),
    ("1 / 0", "division by zero"),
    ("9 ** 9 ** 9", "exponent"),
    ("10 ** 60 * 10 ** 60", "more than 100 digits"),
    ("1e308 * 10", "not a finite number"),
    ("1 +", "cannot parse"),
    ("1" * 300, "longer than"),
    ("True + 1", "unsupported syntax: Constant"),
])
def test_calculator_refuses_with_a_reason(expression, reason):
    with pytest.raises(ValueError, match=reason):
        calculate(expression)


def test_steps_answer_with_observations_never_raise():
    env = make_env("calculator")
    env.reset({})
    assert env.step(ToolCall("calculator", {"expression": "48213 + 97154"})) == StepResult("145367")
    assert env.step(ToolCall("calc", {})).observation == "error: unknown tool 'calc'; available: calculator"
    assert env.step(ToolCall("calculator", {})).observation.startswith("error: bad arguments for calculator: "
                                                                        "'expression' is a required property")
    assert "is not of type 'string'" in env.step(ToolCall("calculator", {"expression": 3})).observation
    assert "Additional properties" in env.step(ToolCall("calculator", {"expression": "1", "x": 1})).observation
    assert env.step(ToolCall("calculator", {"expression": "1/0"})).observation == "error: division by zero"
    with pytest.raises(ValueError, match="unknown environment 'calc'"):
        make_env("calc")


def test_interpreter_keeps_state_shows_only_the_new_output_and_reports_errors():
    env = make_env("python")
    env.reset({})
    assert env.step(ToolCall("python", {"code": "x = 40\nprint('set')"})).observation == "set\n"
    assert env.step(ToolCall("python", {"code": "print(x + 2)"})).observation == "42\n"
    failed = env.step(ToolCall("python", {"code": "print('before')\n1 / 0"})).observation
    assert failed.startswith("error: ZeroDivisionError: division by zero") and "before" in failed
    assert env.step(ToolCall("python", {"code": "print(x)"})).observation == "40\n"  # the failed cell is not replayed
    assert env.step(ToolCall("python", {"code": "pass"})).observation == "(no output)"
    long = env.step(ToolCall("python", {"code": "print('y' * 5000)"})).observation
    assert len(long) < MAX_OBSERVATION + 100 and "output cut" in long
    env.reset({})
    assert "NameError" in env.step(ToolCall("python", {"code": "print(x)"})).observation


def test_tool_demonstrations_hold_the_calculators_results():
    records = tool_arithmetic_dataset(64, seed=3, digits=5, tool_share=0.5)
    with_tool = [r for r in records if len(r["messages"]) == 4]
    assert 16 < len(with_tool) < 48
    for r in records:
        a, op, b = r["messages"][0]["content"].removeprefix("What is ").removesuffix("?").split()
        assert r["answer"] == str(int(a) + int(b) if op == "+" else int(a) - int(b))
        assert r["messages"][-1]["content"] == f"The answer is {r['answer']}."
    for r in with_tool:
        call = r["messages"][1]["tool_calls"][0]["function"]
        assert calculate(call["arguments"]["expression"]) == r["messages"][2]["content"] == r["answer"]
    assert tool_arithmetic_dataset(64, seed=3, digits=5, tool_share=0.5) == records
