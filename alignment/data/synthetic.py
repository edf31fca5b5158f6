"""The embedded task: multi-step integer arithmetic with a verifiable numeric answer.

Generated, not downloaded, so the default jobs run on a fresh machine. Each record is in chat form
with a `category` and the reference `answer`, like the JSONL sources.
"""
from __future__ import annotations

import numpy as np


OPERATIONS = "+-"
OPERATION_NAMES = {"+": "addition", "-": "subtraction"}  # a problem's category with by_operation
ANSWER_FORMAT = "The answer is {}."


def arithmetic_record(rng: np.random.Generator, max_operand: int = 9, num_ops: int = 2,
                      answer_noise: float = 0.0, ops: str = OPERATIONS, answer_format: str = ANSWER_FORMAT,
                      by_operation: bool = False) -> dict:
    """One problem such as 'What is 8 + 7 - 5?' (operands 1..max_operand, `num_ops` operations drawn from
    `ops`) with a worked solution ending in `answer_format` ('The answer is N.'). Its category is 'math', or with
    `by_operation` the name of its one operation ('addition', 'subtraction'; 'mixed' when it has both).

    With probability `answer_noise` the solution's final answer is off by one (the reference `answer`
    stays right): imperfect demonstrations, the kind of SFT data RL with a verifiable reward corrects.
    """
    value = int(rng.integers(1, max_operand + 1))
    expression, steps, used = str(value), [], set()
    for _ in range(num_ops):
        op = str(rng.choice(list(ops))) if len(ops) > 1 else ops
        used.add(op)
        operand = int(rng.integers(1, max_operand + 1))
        result = value + operand if op == "+" else value - operand
        steps.append(f"{value} {op} {operand} = {result}.")
        expression += f" {op} {operand}"
        value = result
    stated = value + 1 if rng.random() < answer_noise else value
    solution = " ".join(steps + [answer_format.format(stated)])
    category = ("mixed" if len(used) > 1 else OPERATION_NAMES[used.pop()]) if by_operation else "math"
    return {
        "messages": [
            {"role": "user", "content": f"What is {expression}?"},
            {"role": "assistant", "content": solution},
        ],
        "category": category,
        "answer": str(value),
    }


def arithmetic_dataset(num_records: int, seed: int, max_operand: int = 9, num_ops: int = 2,
                       answer_noise: float = 0.0, ops: str = OPERATIONS, answer_format: str = ANSWER_FORMAT,
                       by_operation: bool = False) -> list[dict]:
    """`num_records` problems from one seeded generator (the same arguments give the same records)."""
    if not ops or set(ops) - set(OPERATIONS):
        raise ValueError(f"arithmetic ops={ops!r}: use one or more of {OPERATIONS!r}")
    if max_operand < 1 or num_ops < 1 or not 0 <= answer_noise <= 1:
        raise ValueError(f"arithmetic needs max_operand >= 1, num_ops >= 1 and answer_noise in [0, 1]; got "
                         f"max_operand={max_operand}, num_ops={num_ops}, answer_noise={answer_noise}")
    if "{}" not in answer_format:
        raise ValueError(f"arithmetic answer_format={answer_format!r} must hold '{{}}' where the answer goes")
    rng = np.random.default_rng(seed)
    return [arithmetic_record(rng, max_operand, num_ops, answer_noise, ops, answer_format, by_operation)
            for _ in range(num_records)]
