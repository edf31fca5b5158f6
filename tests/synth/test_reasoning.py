"""Reasoning: the puzzles' answers against an independent solver, answer matching, the chain-of-thought and
reflection checks on hand-made traces, the easy-share knob, and a run over HTTP."""
import datetime
import json
import re

import pytest

from alignment import stages
from alignment.config import config_path, load_config_file
from alignment.synth import reasoning as recipe


def solve(problem: str) -> str | None:
    """An independent solver for the ordering and weekday puzzles."""
    clues = re.findall(r"(\w+) is taller than (\w+)\.", problem)
    if clues:
        people = {p for clue in clues for p in clue}
        shorter = {b for _, b in clues}
        taller = {a for a, _ in clues}
        return (people - taller if "shortest" in problem else people - shorter).pop()
    day = re.search(r"Today is (\w+)\.", problem)
    if day:
        monday = datetime.date(2024, 1, 1)  # a Monday
        today = monday + datetime.timedelta(days=recipe._DAYS.index(day.group(1)))
        offset = int(re.search(r"(\d+) days", problem).group(1)) - (2 if "day before yesterday" in problem else 0)
        return (today + datetime.timedelta(days=offset)).strftime("%A")
    return None


def test_puzzle_answers_match_an_independent_solver():
    pool = recipe.embedded_pool(120, seed=3)
    solved = [p for p in pool if solve(p["problem"]) is not None]
    assert len(solved) == 60
    assert all(solve(p["problem"]) == p["answer"] for p in solved)
    assert {p["difficulty"] for p in pool} == set(recipe.DIFFICULTIES)


@pytest.mark.parametrize("text, reference, same", [
    ("Step 1.\nThe answer is Ben.", "Ben", True),
    ("The answer is the Ben.", "Ben", True),
    ("The answer is **Friday**.", "Friday", True),
    ("The answer is 12.", "12", True),
    ("The answer is 12.0", "12", True),
    ("The answer is 13.", "12", False),
    ("The answer is yes. Wait, the answer is no.", "no", True),
    ("I do not know.", "no", False),
])
def test_final_answers_match_words_and_numbers(text, reference, same):
    assert recipe.same_answer(recipe.final_answer(text), reference) is same


def test_chain_of_thought_and_reflection_checks_on_hand_made_traces():
    assert recipe.cot_failures("Ann is taller than Ben.\nSo Ann is tallest.\nThe answer is Ann.", "Ann") == []
    assert recipe.cot_failures("The answer is Ann.", "Ann") == ["reasoning:no_steps"]
    assert recipe.cot_failures("Step.\nThe answer is Ben.", "Ann") == ["reasoning:wrong_final_answer"]
    good = "I first said Ben.\nWait, that skips a clue: Ann is taller than Ben.\nThe answer is Ann."
    assert recipe.reflection_failures(good, "Ann", "Ben") == []
    assert recipe.reflection_failures("Start over.\nWait, Ann is taller than the others.\nThe answer is Ann.", "Ann",
                                      "Ben") == ["reflection:ignores_first_attempt"]
    assert recipe.reflection_failures("I first said Ben.\nAnn beats Ben.\nThe answer is Ann.", "Ann", "Ben") == [
        "reflection:no_reflection"]
    given = "I first said Ben.\nWait, let me check.\nThe correct answer was given as Ann.\nThe answer is Ann."
    assert recipe.reflection_failures(given, "Ann", "Ben") == []  # the mention is stripped, the trace still ends right
    assert "given" not in recipe._clean(given)


def test_the_easy_share_knob_drops_easy_problems(tmp_path):
    options = type("O", (), dict(problems="embedded", num_items=90, easy_keep=0.25, reflection_share=0.5))
    work, filtered = recipe.items(options, 0, None)
    easy_before = sum(p["difficulty"] == "easy" for p in recipe.embedded_pool(90, 0))
    easy = sum(w["difficulty"] == "easy" for w in work)
    assert easy == round(0.25 * easy_before) and filtered == {"easy_share_reduction": easy_before - easy}
    assert len(work) == 90 - filtered["easy_share_reduction"]


def test_reasoning_end_to_end_over_http(tmp_path):
    config = load_config_file(config_path("synth/reasoning"))
    config.reasoning.num_items = 60
    config.teacher.flaw_rate = 0.4
    summary = stages.run("synth", config, str(tmp_path))
    assert summary["kept_by_trace"]["reflection"] > 0 and summary["kept_by_trace"]["chain_of_thought"] > 0
    assert {"reasoning:wrong_final_answer", "reflection:no_reflection"} <= set(summary["rejected"])
    for line in open(tmp_path / "sft.jsonl"):
        record = json.loads(line)
        trace = record["messages"][1]["content"]
        assert recipe.same_answer(recipe.final_answer(trace), record["answer"]) and "given" not in trace
