"""Metrics on hand-computed cases: GSM8K, math equivalence, pass@k, CFBench/SysBench/FB-Bench, UX, RM."""
import itertools
import math

import numpy as np
import pytest

from alignment.eval import answers, checklist, passk, preference


@pytest.mark.parametrize("response,expected", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("The answer is 1,234.", "1234"),
    ("So the answer is $18.00, which we double-check: 9 * 2 = 18.", "18"),  # first number after the marker
    ("We get \\boxed{-3.50}", "-3.5"),
    ("First 3 then 4 then 7", "7"),  # no marker: the last number
    ("no digits at all", None),
])
def test_final_number(response, expected):
    assert answers.final_number(response) == expected


def test_gsm8k_reference_and_match():
    assert answers.gsm8k_reference("Janet sells 9 eggs.\n#### 1,800") == "1800"
    assert answers.gsm8k_correct("The answer is 1800.", "1800")
    assert answers.gsm8k_correct("The answer is 1800.0", "1800")
    assert not answers.gsm8k_correct("The answer is 180.", "1800")
    assert not answers.gsm8k_correct("I don't know", "1800")
    with pytest.raises(ValueError, match="####"):
        answers.gsm8k_reference("no final line")


@pytest.mark.parametrize("response,reference,expected", [
    ("The answer is $\\boxed{0.5}$", "\\frac{1}{2}", True),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", True),
    ("\\boxed{2^{1/2}}", "\\sqrt{2}", True),
    ("\\boxed{4}", "3", False),
    ("I cannot solve this", "\\frac{1}{2}", False),
])
def test_math_equivalent(response, reference, expected):
    assert answers.math_equivalent(response, reference) is expected


def _brute_pass_at_k(n, c, k):
    """Fraction of all k-subsets of n samples (c of them correct) that contain a correct one."""
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 1, 1), (5, 2, 2), (6, 3, 4), (7, 7, 3), (8, 2, 5), (4, 1, 4)])
def test_pass_at_k_matches_brute_force(n, c, k):
    assert passk.pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_large_n_matches_exact_combinatorics():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(50, 400))
        c, k = int(rng.integers(0, n + 1)), int(rng.integers(1, 20))
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert passk.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-10, abs=1e-12)


def test_pass_at_k_rejects_bad_input_and_averages():
    with pytest.raises(ValueError):
        passk.pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="at least 5"):
        passk.pass_at_k(3, 1, 5)
    # problem 1: 1 of 2 pass -> pass@1 0.5; problem 2: 2 of 2 -> 1.0
    assert passk.mean_pass_at_k([[True, False], [True, True]], 1) == pytest.approx(0.75)


def test_completion_program_accepts_continuations_and_whole_functions():
    prompt = 'def add(a, b):\n    """Sum."""\n'
    test = "def check(f):\n    assert f(2, 3) == 5\n"
    continuation = passk.completion_solution(prompt, "    return a + b\n", "add")
    whole = passk.completion_solution(prompt, "Sure:\n```python\ndef add(a, b):\n    return a + b\n```", "add")
    for solution in (continuation, whole):
        scope = {}
        exec(f"{solution}\n{test}\ncheck(add)\n", scope)  # raises if check() fails


# ---- CFBench: per-sample CSR / ISR / PSR ----

P, S = checklist.PRIMARY, checklist.SECONDARY


def test_csr_isr():
    assert checklist.csr([1, 0, 1, 1]) == 0.75
    assert checklist.isr([1, 0, 1, 1]) == 0.0
    assert checklist.isr([1, 1]) == 1.0
    with pytest.raises(ValueError):
        checklist.csr([1, 2])


@pytest.mark.parametrize("scores,priorities,expected", [
    # all secondary: passes only when more than 80% are met
    ([1, 1, 1, 1, 1], [S] * 5, 1.0),
    ([1, 1, 1, 1, 0], [S] * 5, 0.0),  # exactly 80%
    ([1, 1, 1, 1, 1, 0], [S] * 6, 1.0),  # 83%
    # all primary: all must be met
    ([1, 1], [P, P], 1.0),
    ([1, 0], [P, P], 0.0),
    # mixed: every primary met and more than 60% of the secondary
    ([1, 1, 1, 0], [P, S, S, S], 1.0),  # 2/3 secondary
    ([1, 1, 1, 1, 0, 0], [P, S, S, S, S, S], 0.0),  # 3/5 = exactly 60%
    ([0, 1, 1, 1], [P, S, S, S], 0.0),  # a primary failed
    ([1, 0], [P, S], 0.0),
])
def test_cfbench_psr(scores, priorities, expected):
    assert checklist.psr(scores, priorities) == expected


def test_cfbench_metrics_mean_over_samples():
    scores = [[1, 1, 0], [1, 1], [0, 1]]
    priorities = [[P, S, S], [P, P], [P, S]]
    m = checklist.cfbench_metrics(scores, priorities)
    assert m["CSR"] == pytest.approx((2 / 3 + 1 + 0.5) / 3)
    assert m["ISR"] == pytest.approx(1 / 3)
    assert m["PSR"] == pytest.approx(1 / 3)  # sample 1: 1/2 secondary fails 60%; sample 3: primary failed


def test_sysbench_metrics():
    sessions = [
        [[1, 1], [1, 0], [1, 1]],  # turn 2 fails: stable for 1 of 3 turns
        [[1], [1]],  # stable throughout
    ]
    m = checklist.sysbench_metrics(sessions)
    assert m["CSR"] == pytest.approx((1 + 0.5 + 1 + 1 + 1) / 5)
    assert m["ISR"] == pytest.approx(4 / 5)
    assert m["SSR"] == pytest.approx((1 / 3 + 1) / 2)


def test_weighted_checklist():
    assert checklist.weighted_score([1, 0, 1], [0.5, 0.3, 0.2]) == pytest.approx(0.7)
    assert checklist.weighted_score([1, 0], [2, 2]) == pytest.approx(0.5)  # weights need not sum to 1
    with pytest.raises(ValueError):
        checklist.weighted_score([1, 0], [0.5])


def test_ux_pass_rate_by_category():
    rates = checklist.pass_rate_by_category([[1, 1], [1, 0], [1], [0, 0, 0]], ["chat", "chat", "code", "code"])
    assert rates == {"chat": 0.5, "code": 0.5, "all": 0.5}
    rates = checklist.pass_rate_by_category([[1, 1], [1, 1], [1, 0]], ["a", "a", "b"])
    assert rates == {"a": 1.0, "b": 0.0, "all": pytest.approx(2 / 3)}


def test_pairwise_accuracy():
    m = preference.pairwise_accuracy([2.0, 1.0, 0.5, 3.0], [1.0, 1.5, 0.5, -1.0])
    assert m["accuracy"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert m["ties"] == 1 and m["pairs"] == 4
    assert m["mean_margin"] == pytest.approx((1 - 0.5 + 0 + 4) / 4)
    with pytest.raises(ValueError):
        preference.pairwise_accuracy([1.0], [float("nan")])


def test_shared_gsm8k_references_parse_and_score_themselves(shared_data):
    from alignment.eval import benchmarks

    samples = benchmarks.load_gsm8k(str(shared_data / "gsm8k" / "test.jsonl"), 0, 0)
    assert len(samples) == 1319
    lines = (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()
    import json
    solutions = [json.loads(line)["answer"] for line in lines if line.strip()]
    results = benchmarks.score_numeric(samples, solutions, benchmarks.Context())
    assert all(r["score"] == 1.0 for r in results)  # each worked solution ends in its own '#### N'


def test_shared_cfbench_loads_with_priorities(shared_data):
    from alignment.eval import benchmarks

    samples = benchmarks.load_cfbench(str(shared_data / "cfbench" / "cfbench_data.json"), 0, 0)
    assert len(samples) == 1000
    assert {s["category"] for s in samples} == {"easy", "hard"}
    assert sum(len(s["criteria"]) for s in samples) == 4237
    assert all(len(s["criteria"]) == len(s["priorities"]) for s in samples)
