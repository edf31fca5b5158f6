"""The embedded task: multi-step integer arithmetic with a verifiable numeric answer.

Generated, not downloaded, so the default jobs run on a fresh machine. Each record is in chat form
with a `category` and the reference `answer`, like the JSONL sources.
"""
from __future__ import annotations

import numpy as np


def arithmetic_record(rng: np.random.Generator, max_operand: int = 9, num_ops: int = 2) -> dict:
    """One problem such as 'What is 12 + 7 - 5?' with a worked solution ending in 'The answer is N.'"""
    value = int(rng.integers(1, max_operand + 1))
    expression, steps = str(value), []
    for _ in range(num_ops):
        op = str(rng.choice(["+", "-"]))
        operand = int(rng.integers(1, max_operand + 1))
        result = value + operand if op == "+" else value - operand
        steps.append(f"{value} {op} {operand} = {result}.")
        expression += f" {op} {operand}"
        value = result
    solution = " ".join(steps) + f" The answer is {value}."
    return {
        "messages": [
            {"role": "user", "content": f"What is {expression}?"},
            {"role": "assistant", "content": solution},
        ],
        "category": "math",
        "answer": str(value),
    }


def arithmetic_dataset(num_records: int, seed: int, max_operand: int = 9, num_ops: int = 2) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [arithmetic_record(rng, max_operand, num_ops) for _ in range(num_records)]
