"""pass@k for sampled code solutions, and the code of a HumanEval-style completion."""
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


def completion_solution(prompt: str, response: str, entry_point: str) -> str:
    """The code a model response gives for a HumanEval prompt, which is either a continuation of the prompt or,
    as chat models usually answer, a whole function. A whole function goes after the prompt, whose stub
    (signature + docstring) is valid Python and is simply redefined; the prompt keeps its imports."""
    code = extract_code(response)
    return prompt + ("\n" if f"def {entry_point}" in code else "") + code
