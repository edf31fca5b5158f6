"""Math: the generated problems' answers against an independent computation (sympy, brute force), balanced
sampling, reference stripping and the solution check on hand-made solutions, the category-share mix, a run."""
import collections
import json
import re

import pytest
import sympy

from alignment import stages
from alignment.config import config_path, load_config_file
from alignment.synth import math_solutions as recipe

TAXONOMY = recipe.load_taxonomy()


def _sympy_value(text: str):
    return sympy.nsimplify(sympy.sympify(text.replace("×", "*").replace("−", "-")))


def independent_answer(point: str, problem: str):
    """The answer recomputed from the problem text alone."""
    numbers = [int(n) for n in re.findall(r"-?\d+", problem)]
    if point == "arithmetic.order_of_operations":
        return _sympy_value(problem.removeprefix("Compute ").rstrip("."))
    if point == "arithmetic.fractions":
        if problem.startswith("Add"):
            return _sympy_value(" + ".join(re.findall(r"\d+/\d+", problem)))
        return _sympy_value(problem.removeprefix("Compute ").rstrip("."))
    if point == "algebra.linear_equations":
        x = sympy.Symbol("x")
        left, right = problem.removeprefix("Solve for x: ").rstrip(".").split(" = ")
        side = lambda text: sympy.sympify(re.sub(r"(\d)x", r"\1*x", text))  # noqa: E731
        return sympy.solve(side(left) - side(right), x)[0]
    if point == "probability.dice":
        s = numbers[-1]
        rolls = [(i, j) for i in range(1, 7) for j in range(1, 7)]
        test = {"is": lambda i, j: i + j == s, "at least": lambda i, j: i + j >= s,
                "more than": lambda i, j: i % 2 == 0 and j % 2 == 0 and i + j > s}
        kind = next(k for k in ("at least", "more than", "is") if f"{k} {s}" in problem)
        return sympy.Rational(sum(test[kind](i, j) for i, j in rolls), 36)
    if point == "number_theory.gcd_lcm":
        return sympy.gcd(*numbers) if "greatest" in problem else sympy.lcm(numbers)
    return None


def test_generated_answers_match_an_independent_computation():
    pool = recipe.embedded_pool(TAXONOMY, 12, seed=5)
    checked = 0
    for problem in pool:
        expected = independent_answer(problem["knowledge_point"], problem["problem"])
        if expected is not None:
            assert sympy.nsimplify(problem["answer"]) == expected, problem
            checked += 1
    assert checked == 5 * 3 * 12


def test_sampling_is_balanced_over_levels_and_knowledge_points():
    pool = recipe.embedded_pool(TAXONOMY, 10, seed=1)
    chosen, filtered = recipe.balanced(pool, 60, seed=0)
    cells = collections.Counter((p["knowledge_point"], p["level"]) for p in chosen)
    assert len(cells) == 30 and max(cells.values()) == 2
    assert filtered["duplicate"] + filtered["over_quota"] + len(chosen) == len(pool)
    assert filtered.get("cells_short_of_quota", 0) == sum(v < 2 for v in cells.values())


def test_reference_mentions_are_stripped_sentence_by_sentence():
    text = ("Step 1: 3 + 4 = 7. This matches the reference answer.\nStep 2: double it.\n"
            "The reference answer is 14.\nThe answer is \\boxed{14}.")
    stripped, removed = recipe.strip_reference(text)
    assert removed == 2 and "reference" not in stripped
    assert stripped == "Step 1: 3 + 4 = 7.\nStep 2: double it.\nThe answer is \\boxed{14}."


class MainThreadSession:
    on_main = staticmethod(lambda fn, *args: fn(*args))


@pytest.mark.parametrize("solution, failures", [
    ("Step 1: half of 12 is 6.\nStep 2: add 1.\nThe answer is \\boxed{7}.", []),
    ("Step 1: half of 12 is 6.\nStep 2: add 1.\nThe answer is \\boxed{\\frac{14}{2}}.", []),
    ("Step 1: half of 12 is 6.\nStep 2: add 2.\nThe answer is \\boxed{8}.", ["math:wrong_final_answer"]),
    ("Step 1: half of 12 is 6.\nStep 2: add 1.\nSo we get seven.", ["math:no_final_answer"]),
    ("The answer is \\boxed{7}.", ["math:no_steps"]),
    ("Step 1: half of 12 is 6.\nStep 2: add 1.\nThe reference answer is \\boxed{7}.", ["math:no_final_answer"]),
])
def test_solution_check_on_hand_made_solutions(solution, failures):
    assert recipe.solution_failures(solution, "7", 2, MainThreadSession()) == failures


def test_mix_puts_math_at_its_share():
    math_records, others = [{"m": i} for i in range(50)], [{"o": i} for i in range(100)]
    mixed, report = recipe.mix(math_records, others, 0.2, seed=0)
    assert report["math"] == 25 and report["other"] == 100 and report["math_share"] == 0.2
    mixed, report = recipe.mix(math_records[:10], others, 0.2, seed=0)
    assert report == {"math": 10, "other": 40, "math_share": 0.2, "math_dropped": 0, "other_dropped": 60}
    assert len(mixed) == 50


def test_math_end_to_end_over_http_with_a_mix(tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                                      {"role": "assistant", "content": "hello"}]}) + "\n"
                             for i in range(200)))
    config = load_config_file(config_path("synth/math"))
    config.math.update(num_items=60, mix_with=str(other))
    config.teacher.flaw_rate = 0.4
    summary = stages.run("synth", config, str(tmp_path / "run"))
    assert summary["items"] == 60 and set(summary["kept_by_level"]) == {"1", "2", "3"}
    assert {"math:wrong_final_answer", "math:no_steps"} <= set(summary["rejected"])
    assert summary["mix"]["math_share"] == pytest.approx(0.2, abs=0.01)
    records = [json.loads(line) for line in open(tmp_path / "run" / "sft.jsonl")]
    for record in records:
        solution = record["messages"][1]["content"]
        assert "reference" not in solution.lower() and "\\boxed" in solution
        assert "Reference" not in record["messages"][0]["content"]
    for line in open(tmp_path / "run" / "pairs.jsonl"):
        assert json.loads(line)["messages"][0]["content"].startswith(("Compute", "Add", "What", "A ", "Solve", "Share",
                                                                      "Two", "How"))
