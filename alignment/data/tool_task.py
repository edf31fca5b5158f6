"""The embedded tool-use task: arithmetic on numbers too large for a tiny model to add in its head, with a
calculator tool whose calls are executed here, so every demonstration's result is the calculator's own.

    calculator(expression) -> the value of an arithmetic expression (integers and decimals; + - * / // % **
    and parentheses), evaluated from its syntax tree with bounded sizes, never with eval.

`tool_arithmetic_dataset` writes chat records such as "What is 48213 + 97154?" whose demonstration either calls
the calculator and answers with its result (a share `tool_share` of them) or answers directly; the reference
`answer` is always right, so a model imitating the direct answers guesses, and one that calls the tool is right.
"""
from __future__ import annotations

import ast
import operator

import numpy as np

from alignment.data.synthetic import ANSWER_FORMAT
from alignment.data.tools import ToolCall

CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression (integers and decimals, + - * / // % ** and parentheses).",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "for example: 48213 + 97154"}},
            "required": ["expression"],
            "additionalProperties": False,
        },
    },
}
MAX_EXPRESSION = 256  # characters
MAX_DIGITS = 100  # of any operand or result
MAX_EXPONENT = 64

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _bounded(value: int | float) -> int | float:
    if isinstance(value, int) and len(str(abs(value))) > MAX_DIGITS:
        raise ValueError(f"a number has more than {MAX_DIGITS} digits")
    if isinstance(value, float) and not np.isfinite(value):
        raise ValueError("the result is not a finite number")
    return value


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponent {right} is larger than {MAX_EXPONENT}")
        try:
            return _bounded(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        except OverflowError:
            raise ValueError("the result is too large") from None
    raise ValueError(f"unsupported syntax: {type(node).__name__} (numbers, + - * / // % ** and parentheses only)")


def calculate(expression: str) -> str:
    """The value of `expression` as text (an integer, or a decimal to 12 significant digits); ValueError with the
    reason for anything else (syntax, names, division by zero, sizes beyond the bounds)."""
    if not isinstance(expression, str):
        raise ValueError(f"expression must be a string, got {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION:
        raise ValueError(f"expression is longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot parse {expression!r} as arithmetic") from None
    value = _evaluate(tree.body)
    if isinstance(value, complex):
        raise ValueError("the result is not a real number")
    return str(value) if isinstance(value, int) else f"{value:.12g}"


def tool_arithmetic_record(rng: np.random.Generator, digits: int = 5, ops: str = "+-", tool_share: float = 0.5,
                           answer_format: str = ANSWER_FORMAT) -> dict:
    """One problem `a op b` with `digits`-digit operands; the demonstration calls the calculator with probability
    `tool_share` (its result comes from `calculate`), else states the answer directly."""
    low, high = 10 ** (digits - 1), 10 ** digits
    a, b = (int(x) for x in rng.integers(low, high, size=2))
    op = str(rng.choice(list(ops)))
    expression = f"{a} {op} {b}"
    answer = calculate(expression)
    question = {"role": "user", "content": f"What is {expression}?"}
    final = {"role": "assistant", "content": answer_format.format(answer)}
    if rng.random() < tool_share:
        call = ToolCall("calculator", {"expression": expression}, id="call_0")
        messages = [question, {"role": "assistant", "content": "", "tool_calls": [call.message_entry()]},
                    {"role": "tool", "tool_call_id": call.id, "content": calculate(expression)}, final]
    else:
        messages = [question, final]
    return {"messages": messages, "category": "tools", "answer": answer}


def tool_arithmetic_dataset(num_records: int, seed: int, digits: int = 5, ops: str = "+-", tool_share: float = 0.5,
                            answer_format: str = ANSWER_FORMAT) -> list[dict]:
    """`num_records` problems from one seeded generator (the same arguments give the same records)."""
    if not ops or set(ops) - set("+-*"):
        raise ValueError(f"tool arithmetic ops={ops!r}: use one or more of '+-*'")
    if not 1 <= digits <= 18 or not 0 <= tool_share <= 1:
        raise ValueError(f"tool arithmetic needs 1 <= digits <= 18 and tool_share in [0, 1]; got digits={digits}, "
                         f"tool_share={tool_share}")
    rng = np.random.default_rng(seed)
    return [tool_arithmetic_record(rng, digits, ops, tool_share, answer_format) for _ in range(num_records)]
