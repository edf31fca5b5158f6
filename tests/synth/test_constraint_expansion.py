"""Constraint expansion: the validator's rules on hand-made instructions, and the recipe end to end over HTTP with
every kept response re-checked by the IFEval checkers and every pair's rejected response failing its named check."""
import json
import types

import pytest

from alignment import stages
from alignment.config import config_path, load_config_file
from alignment.rewards import ifeval
from alignment.synth import constraint_expansion as recipe
from alignment.synth import constraints as C

TAXONOMY = C.load_taxonomy()
OPTIONS = types.SimpleNamespace(min_seed_overlap=0.6, max_instruction_words=40)
SEED = "Write a short poem about the old lighthouse."
DRAWN = [{"type": "rule.end_phrase", "kwargs": {"end_phrase": "That is all for now."}},
         {"type": "numerical.words", "kwargs": {"relation": "less than", "num_words": 40}}]


@pytest.mark.parametrize("instruction, failures", [
    ('Write a short poem about the old lighthouse in fewer than 40 words, and finish with the exact phrase '
     '"That is all for now."', []),
    ("Write a short poem about the old lighthouse in fewer than 40 words.", ["validator:unstated:rule.end_phrase"]),
    ('Write a short poem about the old lighthouse in more than 40 words; end with "That is all for now."',
     ["validator:unstated:numerical.words"]),
    ('Describe a busy harbor at night in under 40 words. End with "That is all for now."',
     ["validator:seed_request_changed"]),
    ('Write a short poem about the old lighthouse in fewer than 40 words. ' + "Really, " * 30 +
     'end with "That is all for now."', ["validator:too_long"]),
])
def test_the_validator_keeps_only_instructions_stating_every_constraint(instruction, failures):
    assert recipe.instruction_failures(TAXONOMY, SEED, instruction, DRAWN, OPTIONS) == failures


def test_expansion_end_to_end_over_http(tmp_path):
    config = load_config_file(config_path("synth/constraints"))
    config.constraints.num_items = 60
    config.teacher.flaw_rate = 0.3
    summary = stages.run("synth", config, str(tmp_path))
    assert summary["items"] == 60 and summary["kept_items"] + sum(summary["dropped"].values()) == 60
    assert summary["teacher_calls"] > 60 and summary["critic_calls"] > 0
    attempts = [json.loads(line) for line in open(tmp_path / "attempts.jsonl")]
    assert len(attempts) == summary["responses_judged"] == summary["records"] + summary["responses_rejected"]
    assert sum(bool(a["failures"]) for a in attempts) == summary["responses_rejected"] > 0
    assert any(k.startswith("validator:") for k in summary["rejected"])  # flawed rewrites were caught
    assert any(k.startswith(("ifeval:", "rule:")) for k in summary["rejected"])  # and flawed responses
    assert summary["coverage"]["types"] == len(TAXONOMY.types) and summary["coverage"]["coverage"] > 0.6
    records = [json.loads(line) for line in open(tmp_path / "sft.jsonl")]
    assert len(records) == summary["records"] > 30
    for record in records:
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
        outcome = ifeval.evaluate_sample(record["messages"][1]["content"], record["instruction_id_list"],
                                         record["kwargs"])
        assert all(outcome["strict"]), record
        for constraint in record["constraints"]:
            assert C.check(TAXONOMY, constraint, record["messages"][1]["content"]) is not False
    pairs = [json.loads(line) for line in open(tmp_path / "pairs.jsonl")]
    assert len(pairs) == summary["pairs"] > 0
    for pair in pairs:
        constraints = next(r["constraints"] for r in records if r["id"] == pair["id"])
        failed = {C.failure_name(TAXONOMY, c) for c in constraints
                  if C.check(TAXONOMY, c, pair["rejected"]) is False}
        named = set(pair["rejected_failures"])
        assert named == failed or all(n.startswith("judge:") for n in named), pair
    assert json.load(open(tmp_path / "summary.json")) == json.loads(json.dumps(summary))
