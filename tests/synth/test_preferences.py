"""Preference pairs gathered from synth runs: every pair checked, duplicates and the per-prompt excess dropped and
counted, the output readable by the DPO stage's loader."""
import json
import types

from alignment.data import preference
from alignment.synth import preferences as recipe


def write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def pair(prompt, chosen, rejected, failures=("ifeval:punctuation:no_comma",), recipe_name="constraints"):
    return {"id": prompt, "recipe": recipe_name, "messages": [{"role": "user", "content": prompt}], "chosen": chosen,
            "rejected": rejected, "rejected_failures": list(failures)}


def test_pairs_are_checked_deduplicated_capped_and_counted(tmp_path):
    write(tmp_path / "a" / "pairs.jsonl", [
        pair("p1", "good", "bad 1"), pair("p1", "good", "bad 2"), pair("p1", "good", "bad 3"),
        pair("p2", "good", "good"), pair("p3", "good", "bad", failures=()), "{not json",
        {"messages": [], "chosen": "a", "rejected": "b", "rejected_failures": ["x"]}])
    write(tmp_path / "b" / "pairs.jsonl", [pair("p1", "good", "bad 1"),
                                           pair("q", "7", "8", ["math:wrong_final_answer"], "math")])
    options = types.SimpleNamespace(max_per_prompt=2)
    summary = recipe.gather([str(tmp_path / "a"), str(tmp_path / "b")], options, 0, str(tmp_path))
    assert summary["pairs"] == 3 and summary["duplicates"] == 1 and summary["over_per_prompt_cap"] == 1
    assert summary["skipped"] == {"identical_responses": 1, "no_failing_check": 1, "unreadable": 1, "no_prompt": 1}
    assert summary["by_recipe"] == {"constraints": 2, "math": 1}
    assert summary["by_failing_check"] == {"ifeval:punctuation:no_comma": 2, "math:wrong_final_answer": 1}
    loaded = [preference.record_to_pairs(json.loads(line)) for line in open(tmp_path / "pairs.jsonl")]
    assert sorted(p[0].chosen[0]["content"] for p in loaded) == ["7", "good", "good"]


def test_a_missing_source_is_one_line_naming_the_file(tmp_path):
    try:
        recipe.gather([str(tmp_path / "none")], types.SimpleNamespace(max_per_prompt=1), 0, str(tmp_path))
    except FileNotFoundError as e:
        assert str(tmp_path / "none" / "pairs.jsonl") in str(e)
    else:
        raise AssertionError("no error")
