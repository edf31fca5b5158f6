"""The embedded task: multi-step integer arithmetic with a verifiable numeric answer.

Generated, not downloaded, so the default jobs run on a fresh machine. Each record is in chat form
with a `category` and the reference `answer`, like the JSONL sources.
"""
from __future__ import annotations

import numpy as np


def arithmetic_record(rng: np.random.Generator, max_operand: int = 9, num_ops: int = 2,
                      answer_noise: float = 0.0) -> dict:
    """One problem such as 'What is 8 + 7 - 5?' with a worked solution ending in 'The answer is N.'

    With probability `answer_noise` the solution's final answer is off by one (the reference `answer`
    stays right): imperfect demonstrations, the kind of SFT data RL with a verifiable reward corrects.
    """
    value = int(rng.integers(1, max_operand + 1))
    expression, steps = str(value), []
    for _ in range(num_ops):
        op = str(rng.choice(["+", "-"]))
        operand = int(rng.integers(1, max_operand + 1))
        result = value + operand if op == "+" else value - operand
        steps.append(f"{value} {op} {operand} = {result}.")
        expression += f" {op} {operand}"
        value = result
    stated = value + 1 if rng.random() < answer_noise else value
    solution = " ".join(steps) + f" The answer is {stated}."
    return {
        "messages": [
            {"role": "user", "content": f"What is {expression}?"},
            {"role": "assistant", "content": solution},
        ],
        "category": "math",
        "answer": str(value),
    }


def arithmetic_dataset(num_records: int, seed: int, max_operand: int = 9, num_ops: int = 2,
                       answer_noise: float = 0.0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [arithmetic_record(rng, max_operand, num_ops, answer_noise) for _ in range(num_records)]
