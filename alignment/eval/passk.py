"""pass@k for sampled code solutions, and the program that checks a HumanEval-style completion."""
from __future__ import annotations

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al. 2021): 1 - C(n-c, k) / C(n, k).

    Written as a product, 1 - prod_{i=n-c+1}^{n} (1 - k/i), so large n never overflows.
    """
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and k >= 1, got n={n} c={c} k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(passed: list[list[bool]], k: int) -> float:
    """pass@k averaged over problems; `passed[i]` holds the outcomes of problem i's samples."""
    if not passed:
        raise ValueError("mean_pass_at_k needs at least one problem")
    return float(np.mean([pass_at_k(len(p), sum(p), k) for p in passed]))


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The HumanEval check program: prompt + completion define the function, `test` defines check()."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


def extract_code(response: str) -> str:
    """The first fenced code block of a chat response (```python ... ```), else the response itself."""
    start = response.find("```")
    if start < 0:
        return response
    body_start = response.find("\n", start)
    end = response.find("```", body_start + 1) if body_start >= 0 else -1
    if body_start < 0 or end < 0:
        return response[body_start + 1:] if body_start >= 0 else response
    return response[body_start + 1:end]


def completion_program(prompt: str, response: str, test: str, entry_point: str) -> str:
    """The check program for a model response, which is either a continuation of the prompt or, as chat
    models usually answer, a whole function. A whole function is appended after the prompt, whose stub
    (signature + docstring) is valid Python and is simply redefined; the prompt keeps its imports."""
    code = extract_code(response)
    if f"def {entry_point}" in code:
        return humaneval_program(prompt, "\n" + code, test, entry_point)
    return humaneval_program(prompt, code, test, entry_point)
