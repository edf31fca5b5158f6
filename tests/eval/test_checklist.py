"""Metrics on hand-computed cases: CFBench/SysBench/FB-Bench, UX, RM; GSM8K and CFBench on the shared data.
(Final-answer checks and pass@k are tested in test_rewards_math_answers.py and test_rewards_code_solutions.py.)"""
import pytest

from alignment.eval import checklist


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
