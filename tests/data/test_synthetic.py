"""The embedded arithmetic generator: per-operation categories change nothing but the category."""
import numpy as np

from alignment.data.synthetic import arithmetic_dataset
from alignment.eval.benchmarks import load_arithmetic


def test_by_operation_only_renames_the_category():
    plain = arithmetic_dataset(200, seed=5, num_ops=2)
    tagged = arithmetic_dataset(200, seed=5, num_ops=2, by_operation=True)
    assert {r["category"] for r in plain} == {"math"}
    for p, t in zip(plain, tagged):
        assert {**t, "category": "math"} == p
        prompt = p["messages"][0]["content"]
        ops = {token for token in prompt.split() if token in "+-"}
        assert t["category"] == ("mixed" if len(ops) == 2 else {"+": "addition", "-": "subtraction"}[ops.pop()])
    assert {r["category"] for r in tagged} == {"addition", "subtraction", "mixed"}


def test_eval_problems_carry_their_operation_only_when_asked():
    options = dict(num_problems=64, seed=1000, max_operand=9, num_ops=1, ops="+-", answer_format="The answer is {}.")
    plain = load_arithmetic("", 0, 0, **options)
    tagged = load_arithmetic("", 0, 0, **options, by_operation=True)
    assert [s["category"] for s in plain] == ["math"] * 64
    signs = [s["messages"][0]["content"].split()[3] for s in tagged]
    assert [s["category"] for s in tagged] == [{"+": "addition", "-": "subtraction"}[x] for x in signs]
    assert [dict(s, category="math") for s in tagged] == plain
    assert 0 < np.mean([c == "+" for c in signs]) < 1
