"""IFEval checkers against hand-computed strict/loose results for every instruction type, and the metrics."""
import json

import pytest

from alignment.eval import benchmarks
from alignment.rewards import ifeval
from tests import FIXTURES

CASES = json.loads((FIXTURES / "eval" / "ifeval_cases.json").read_text())


def test_fixture_covers_every_instruction_type_both_ways():
    assert {c["instruction_id"] for c in CASES} == set(ifeval.INSTRUCTIONS)
    assert len(ifeval.INSTRUCTIONS) == 25
    for instruction_id in ifeval.INSTRUCTIONS:
        outcomes = {c["strict"] for c in CASES if c["instruction_id"] == instruction_id}
        assert outcomes == {True, False}, instruction_id


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['instruction_id']}-{c['strict']}-{c['loose']}")
def test_checker(case):
    args = (case["response"], case["instruction_id"], case["kwargs"])
    assert ifeval.check_instruction(*args) is case["strict"], case["note"]
    assert ifeval.check_instruction(*args, loose=True) is case["loose"], case["note"]


def test_accuracies_hand_computed():
    results = [
        {"instruction_ids": ["a:x", "b:y"], "strict": [True, False], "loose": [True, True]},
        {"instruction_ids": ["a:x"], "strict": [True], "loose": [True]},
        {"instruction_ids": ["b:y", "b:y"], "strict": [False, False], "loose": [True, False]},
    ]
    m = ifeval.accuracies(results)
    assert m["prompt_strict"] == pytest.approx(1 / 3)
    assert m["prompt_loose"] == pytest.approx(2 / 3)
    assert m["instruction_strict"] == pytest.approx(2 / 5)
    assert m["instruction_loose"] == pytest.approx(4 / 5)
    assert m["by_type_strict"] == {"a:x": 1.0, "b:y": 0.0}


def test_none_kwargs_are_ignored_and_unknown_ids_rejected():
    assert ifeval.check_instruction("no commas", "punctuation:no_comma", {"num_words": None})
    with pytest.raises(ValueError, match="unknown IFEval instruction"):
        ifeval.check_instruction("x", "punctuation:no_semicolon", {})


def test_shared_ifeval_file_loads_and_scores(shared_data):
    samples = benchmarks.load_ifeval(str(shared_data / "ifeval" / "input_data.jsonl"), 0, 0)
    assert len(samples) == 541
    results = benchmarks.score_ifeval(samples[:40], [s["messages"][0]["content"] for s in samples[:40]],
                                      benchmarks.Context())
    metrics = benchmarks.aggregate_ifeval(results, benchmarks.Context())
    assert 0.0 <= metrics["metrics"]["prompt_strict"] <= metrics["metrics"]["prompt_loose"] <= 1.0


def test_bad_ifeval_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"key": 1, "prompt": "p", "instruction_id_list": ["x:y"], "kwargs": [{}]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: unknown instruction ids \['x:y'\]"):
        benchmarks.load_ifeval(str(path), 0, 0)
