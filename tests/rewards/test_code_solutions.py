"""pass@k against brute-force enumeration and exact combinatorics; the code a HumanEval response gives."""
import itertools
import math

import numpy as np
import pytest

from alignment.rewards import code_solutions


def _brute_pass_at_k(n, c, k):
    """Fraction of all k-subsets of n samples (c of them correct) that contain a correct one."""
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 1, 1), (5, 2, 2), (6, 3, 4), (7, 7, 3), (8, 2, 5), (4, 1, 4)])
def test_pass_at_k_matches_brute_force(n, c, k):
    assert code_solutions.pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_large_n_matches_exact_combinatorics():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(50, 400))
        c, k = int(rng.integers(0, n + 1)), int(rng.integers(1, 20))
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert code_solutions.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-10, abs=1e-12)


def test_pass_at_k_rejects_bad_input_and_averages():
    with pytest.raises(ValueError):
        code_solutions.pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="at least 5"):
        code_solutions.pass_at_k(3, 1, 5)
    # problem 1: 1 of 2 pass -> pass@1 0.5; problem 2: 2 of 2 -> 1.0
    assert code_solutions.mean_pass_at_k([[True, False], [True, True]], 1) == pytest.approx(0.75)


def test_completion_program_accepts_continuations_and_whole_functions():
    prompt = 'def add(a, b):\n    """Sum."""\n'
    test = "def check(f):\n    assert f(2, 3) == 5\n"
    continuation = code_solutions.completion_solution(prompt, "    return a + b\n", "add")
    whole = code_solutions.completion_solution(prompt, "Sure:\n```python\ndef add(a, b):\n    return a + b\n```", "add")
    for solution in (continuation, whole):
        scope = {}
        exec(f"{solution}\n{test}\ncheck(add)\n", scope)  # raises if check() fails
