"""Code: conformance and correctness checks on hand-made responses (tests run in the sandbox), follow-up checks,
the pool rebalancing, the stand-in's program bank against its own tests, and a run over HTTP."""
import json
import types

import pytest

from alignment import stages
from alignment.config import config_path, load_config_file
from alignment.rewards import verdict
from alignment.synth import coding as recipe
from alignment.synth import embedded

OPTIONS = types.SimpleNamespace(min_answer_words=5, sandbox_seconds=5.0, knowledge_keep=0.2, max_language_share=0.5)
ITEM = {"id": "t", "prompt": "Write a Python function `double(x)` that doubles x.", "language": "python",
        "category": "algorithm", "tests": ["assert double(2) == 4", "assert double(-1) == -2"]}


@pytest.mark.parametrize("response, failures", [
    ("Here:\n```python\ndef double(x):\n    return 2 * x\n```", []),
    ("```py\ndef double(x):\n    return x + x\n```", []),
    ("```python\ndef double(x):\n    return x * x\n```", ["code:tests_failed"]),
    ("def double(x):\n    return 2 * x", ["code:no_code_block"]),
    ("```javascript\nfunction double(x) { return 2 * x; }\n```", ["code:wrong_language_tag:javascript"]),
    ("```\ndef double(x):\n    return 2 * x\n```", ["code:wrong_language_tag:none"]),
    ("```python\ndef double(x)\n    return 2 * x\n```", ["code:syntax_error"]),
    ("```python\nimport os\nprint(open('/etc/passwd').read())\ndef double(x):\n    return 2 * x\n```",
     ["code:tests_failed"]),  # the sandbox has no /etc/passwd: the program fails, nothing leaks
])
def test_responses_are_checked_for_conformance_and_run_against_the_tests(response, failures):
    assert recipe.response_failures(response, ITEM, ITEM["tests"], OPTIONS) == failures


def test_a_concept_answer_needs_words_not_code():
    qa = {**ITEM, "category": "knowledge_qa"}
    assert recipe.response_failures("A list can change; a tuple cannot.", qa, None, OPTIONS) == []
    assert recipe.response_failures("Lists change.", qa, None, OPTIONS) == ["code:answer_too_short"]


@pytest.mark.parametrize("reply, failures", [
    ({"request": "Building on `double`, write `triple_all(xs)`.", "function": "triple_all",
      "tests": ["assert triple_all([1]) == [3]", "assert triple_all([]) == []"]}, []),
    ({"request": "Now write `double(x)` again.", "function": "double",
      "tests": ["assert double(1) == 2", "assert double(0) == 0"]}, ["follow_up:no_new_function"]),
    ({"request": "Write `sort_names(xs)` for a phone book.", "function": "sort_names",
      "tests": ["assert sort_names(['b', 'a']) == ['a', 'b']", "assert sort_names([]) == []"]},
     ["follow_up:unrelated"]),
    ({"request": "Building on `double`, write `quad(x)`.", "function": "quad", "tests": ["assert quad(1) == 4"]},
     ["follow_up:not_harder"]),
    ({"request": "Building on `double`, write `q(x)`.", "function": "q", "tests": ["for i in range(3): assert q(i)"]},
     ["follow_up:tests_cannot_be_judged"]),
])
def test_follow_up_requests_must_be_new_related_harder_and_judgeable(reply, failures):
    assert recipe.follow_up_failures(json.dumps(reply), ITEM)[0] == failures
    assert recipe.follow_up_failures("no json here", ITEM)[0] == ["follow_up:unreadable"]


def test_rebalancing_cuts_knowledge_qa_very_difficult_and_dominant_languages():
    pool = ([{"category": "knowledge_qa", "difficulty": "easy", "language": "python"}] * 10
            + [{"category": "algorithm", "difficulty": "very_difficult", "language": "python"}] * 3
            + [{"category": "algorithm", "difficulty": "easy", "language": "python"}] * 8
            + [{"category": "algorithm", "difficulty": "easy", "language": "go"}] * 2)
    kept, filtered = recipe.rebalance(pool, OPTIONS, seed=0)
    assert filtered == {"knowledge_qa_downsampled": 8, "very_difficult": 3, "language_balance": 4}
    assert len(kept) == 8 and sum(r["language"] == "python" for r in kept) == 6  # 50% of the 12 after the cuts


def test_the_stand_ins_programs_pass_their_tests_and_its_bugs_fail_them():
    for line in open(recipe.POOL_PATH):
        task = json.loads(line)
        if "tests" not in task:
            continue
        entry = embedded._CODE["python"][task["id"].removeprefix("code-")]
        suite = verdict.code_suite(task["tests"], task["id"])
        assert verdict.judge(entry["solution"], suite).status == "passed", task["id"]
        assert verdict.judge(entry["buggy"], suite).status == "failed", task["id"]
        follow = entry["follow_up"]
        assert verdict.judge(follow["solution"], verdict.code_suite(follow["tests"], task["id"])).status == "passed"


def test_code_end_to_end_over_http(tmp_path):
    config = load_config_file(config_path("synth/code"))
    config.code.follow_up_share = 1.0
    config.teacher.flaw_rate = 0.4
    summary = stages.run("synth", config, str(tmp_path))
    assert summary["filtered"]["very_difficult"] == 3 and summary["filtered"]["knowledge_qa_downsampled"] == 8
    assert summary["follow_ups"]["kept"] > 0 and summary["pairs"] > 0
    assert {"code:tests_failed", "code:no_code_block"} & set(summary["rejected"])
    records = [json.loads(line) for line in open(tmp_path / "sft.jsonl")]
    assert any(len(r["messages"]) == 4 for r in records)  # multi-turn follow-ups
    assert max(summary["kept_by_language"].values()) <= 0.6 * sum(summary["kept_by_language"].values()) + 1
