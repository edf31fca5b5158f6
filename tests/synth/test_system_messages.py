"""System messages: the decomposition check, the TF-IDF vectors against an independent computation, assembly
draws, the combination rules on hand-made candidates, and a run over HTTP."""
import collections
import json
import math
import re
import types

import numpy as np

from alignment import stages
from alignment.config import config_path, load_config_file
from alignment.synth import constraints as C
from alignment.synth import system_messages as recipe

SEED = ("You are a travel planner. You help users plan trips on a budget.\n\nWork in steps: first ask about dates, "
        "then propose a plan.\n\nReply with a day-by-day plan.\n\nNever book anything.\n\nBegin the conversation "
        "with: \"Where to?\"")
PARTS = dict(zip(recipe.COMPONENTS, SEED.split("\n\n")))


def test_decomposition_must_copy_all_five_components_from_the_seed():
    assert recipe.decomposition_failures(json.dumps(PARTS), SEED, 0.9) == ([], PARTS)
    missing = {k: v for k, v in PARTS.items() if k != "workflow"}
    assert recipe.decomposition_failures(json.dumps(missing), SEED, 0.9)[0] == ["decomposition:missing:workflow"]
    invented = {**PARTS, "constraints": "Always answer in rhyming couplets with many emojis."}
    assert recipe.decomposition_failures(json.dumps(invented), SEED, 0.9)[0] == ["decomposition:not_copied:constraints"]
    assert recipe.decomposition_failures("The prompt describes a planner.", SEED, 0.9)[0] == ["decomposition:not_json"]


def test_word_vectors_are_tf_idf_of_content_words():
    texts = ["plan trips on a budget", "plan meals", "budget budget trips"]
    vectors = recipe.word_vectors(texts, dim=1 << 16)
    tokens = [[w for w in re.findall(r"[a-z]{3,}", t) if w not in recipe._STOP] for t in texts]
    df = collections.Counter(w for words in tokens for w in set(words))
    for row, words in enumerate(tokens):
        weights = {w: c * (math.log(4 / (1 + df[w])) + 1) for w, c in collections.Counter(words).items()}
        norm = math.sqrt(sum(v * v for v in weights.values()))
        expected = sorted(v / norm for v in weights.values())
        assert np.allclose(sorted(vectors[row][vectors[row] > 0]), expected)


def test_draws_prefer_fitting_members_and_fall_back_to_any():
    groups = {0: [0, 1], 1: [2, 3]}
    rng = np.random.default_rng(0)
    assert {recipe._draw_part(groups, lambda m: m == 3, rng) for _ in range(20)} == {3}
    assert {recipe._draw_part(groups, lambda m: False, rng) for _ in range(50)} == {0, 1, 2, 3}


def test_combination_rules_on_hand_made_candidates():
    types_ = recipe._usable(C.load_taxonomy())
    options = types.SimpleNamespace(max_words=60)
    domains = dict.fromkeys(recipe.COMPONENTS, "travel")
    item = {"parts": PARTS, "sources": dict.fromkeys(recipe.COMPONENTS, "a"), "domains": domains, "added": []}
    text = recipe.assemble(item)
    assert recipe.rule_failures(item, text, [], types_, options) == ["rule:copies_a_seed"]
    mixed = {**item, "sources": {**item["sources"], "workflow": "b"}, "domains": {**domains, "workflow": "cooking"}}
    assert recipe.rule_failures(mixed, text, [], types_, options) == ["rule:workflow_from_another_domain"]
    generic = {**mixed, "domains": {**domains, "workflow": ""}}  # a generic part suits any task
    assert recipe.rule_failures(generic, text, [], types_, options) == []
    added = {**generic, "added": ["Your entire response should be in English and in all lowercase letters; no capital "
                                  "letters are allowed.", "Your entire response should be in English and in all "
                                  "capital letters."]}
    full = recipe.assemble(added)
    _, stated = C.find_stated(types_, full)
    assert len(stated) == 2
    assert recipe.rule_failures(added, full, stated, types_, options) == ["rule:conflicting_constraints",
                                                                           "rule:too_long"]
    assert "rule.repeat_prompt" not in types_.types  # a system message has no request to repeat


def test_system_messages_end_to_end_over_http(tmp_path):
    config = load_config_file(config_path("synth/system_messages"))
    config.system_messages.num_items = 60
    config.teacher.flaw_rate = 0.3
    summary = stages.run("synth", config, str(tmp_path))
    assert summary["filtered"]["seeds_not_decomposed"] < 24 and any(k.startswith("decomposition:")
                                                                    for k in summary["filtered"])
    assert any(k.startswith("rule:") for k in summary["rejected"]) and summary["records"] > 10
    assert summary["kept_mixing_seeds"] == summary["records"]
    taxonomy = recipe._usable(C.load_taxonomy())
    for line in open(tmp_path / "sft.jsonl"):
        record = json.loads(line)
        assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant"]
        _, stated = C.find_stated(taxonomy, record["messages"][0]["content"])
        assert stated == record["constraints"] and C.conflicts(taxonomy, stated) == []
        assert all(C.check(taxonomy, c, record["messages"][2]["content"]) is not False for c in stated)
