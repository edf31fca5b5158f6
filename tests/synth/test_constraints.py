"""The constraint taxonomy: its shape (CFBench categories, IFEval checkers), the rule checkers on hand-made good and
bad responses, how constraints are stated and read back, sampling without conflicts, and coverage."""
import collections
import json

import numpy as np
import pytest

from alignment.rewards import ifeval
from alignment.synth import constraints as C

TAXONOMY = C.load_taxonomy()
CFBENCH_CATEGORIES = {"content", "numerical", "stylistic", "format", "linguistic", "situation", "example", "inverse",
                      "contradictory", "rule"}


def test_taxonomy_has_thirty_types_over_the_cfbench_categories_with_ifeval_checkers():
    types = TAXONOMY.types.values()
    assert len(TAXONOMY.types) >= 30
    assert {t.category for t in types} == CFBENCH_CATEGORIES
    checked = {t.checker for t in types if t.check == "ifeval"}
    assert checked <= set(ifeval.INSTRUCTIONS) and len(checked) >= 20  # most IFEval instructions have a type
    assert {t.checker for t in types if t.check == "rule"} <= set(C.RULES)
    assert all(t.criterion for t in types if t.check == "judge")


@pytest.mark.parametrize("rule, kwargs, good, bad", [
    ("markdown_table", {}, "Intro\n| a | b |\n| --- | --- |\n| 1 | 2 |", "| a | b |\n| 1 | 2 |"),
    ("example_pattern", {"label": "Tip"}, "Tip 1: rest.\nTip 2: eat.", "Tip 1: rest.\nTip 3: eat."),
    ("start_word", {"word": "Well"}, '"Well, here it is."', "Here it is, well."),
    ("max_characters", {"max_chars": 10}, "short", "much longer than ten"),
    ("no_questions", {}, "A statement.", "Is it a question?"),
    ("no_contractions", {}, "It is not so. The river's bend.", "It isn't so."),
    ("example_phrase", {}, "For example, rain.", "Such as rain."),
    ("no_title", {}, "Plain text.", "<<Title>>\ntext"),
])
def test_rules_accept_good_and_reject_bad_responses(rule, kwargs, good, bad):
    assert C.RULES[rule](good, **kwargs) and not C.RULES[rule](bad, **kwargs)


def test_check_uses_the_ifeval_checker_and_leaves_judged_types_to_the_critic():
    end = {"type": "rule.end_phrase", "kwargs": {"end_phrase": "That is all for now."}}
    assert C.check(TAXONOMY, end, "Some text. That is all for now.") is True
    assert C.check(TAXONOMY, end, "That is all for now. More text.") is False
    assert C.failure_name(TAXONOMY, end) == "ifeval:startend:end_checker"
    assert C.check(TAXONOMY, {"type": "stylistic.tone", "kwargs": {"tone": "calm"}}, "anything") is None


def _every_constraint():
    """One constraint per type and parameter choice (the others at their first choice)."""
    for kind in TAXONOMY.types.values():
        base = {n: C.kwarg_value(v[0], "Write a poem about rain.") for n, v in kind.params.items()}
        yield {"type": kind.id, "kwargs": base}
        for name, choices in kind.params.items():
            for choice in choices[1:]:
                yield {"type": kind.id, "kwargs": {**base, name: C.kwarg_value(choice, "Write a poem about rain.")}}


def test_every_stated_constraint_is_read_back_and_counts_as_stated():
    for constraint in _every_constraint():
        seed = "Write a poem about rain."
        text = f"{seed} {C.state(TAXONOMY, constraint)}"
        request, found = C.find_stated(TAXONOMY, text)
        assert request == seed and constraint in found, (text, found)
        assert C.unstated(TAXONOMY, text, [constraint]) == [], text


def test_unstated_names_a_constraint_whose_value_or_cue_is_missing():
    words = {"type": "numerical.words", "kwargs": {"relation": "less than", "num_words": 40}}
    assert C.unstated(TAXONOMY, "Write about rain in fewer than 40 words.", [words]) == []
    assert C.unstated(TAXONOMY, "Write about rain in fewer than 60 words.", [words]) == ["numerical.words"]
    assert C.unstated(TAXONOMY, "Write about rain in at least 40 words.", [words]) == ["numerical.words"]
    assert C.unstated(TAXONOMY, "Write about rain in fewer than forty words.", [words]) == ["numerical.words"]
    keywords = {"type": "content.lexical.include_keywords", "kwargs": {"keywords": ["river", "bread"]}}
    assert C.unstated(TAXONOMY, "Mention river and bread.", [keywords]) == []
    assert C.unstated(TAXONOMY, "Mention the river.", [keywords]) == ["content.lexical.include_keywords"]


def test_samples_never_conflict_and_cover_the_taxonomy_evenly():
    rng, usage = np.random.default_rng(0), collections.Counter()
    sets = [C.sample(TAXONOMY, rng, 3, usage) for _ in range(200)]
    assert all(C.conflicts(TAXONOMY, s) == [] for s in sets)
    counts = [usage[t] for t in TAXONOMY.types]
    assert max(counts) - min(counts) <= 3  # least-used first: every type about equally often
    assert C.conflicts(TAXONOMY, [{"type": "linguistic.case.lowercase", "kwargs": {}},
                                  {"type": "linguistic.case.uppercase", "kwargs": {}}])
    coverage = C.coverage(TAXONOMY, sets, 100, seed=1)
    assert coverage["sample"] == 100 and coverage["covered"] == len(TAXONOMY.types) - len(coverage["missed"])
    assert coverage["coverage"] == coverage["covered"] / len(TAXONOMY.types) >= 0.9


def test_ifeval_fields_are_what_the_ifeval_benchmark_reads():
    chosen = [{"type": "rule.end_phrase", "kwargs": {"end_phrase": "That is all for now."}},
              {"type": "stylistic.tone", "kwargs": {"tone": "calm"}},
              {"type": "linguistic.syntactic.no_comma", "kwargs": {}}]
    fields = C.ifeval_fields(TAXONOMY, chosen)
    assert fields == {"instruction_id_list": ["startend:end_checker", "punctuation:no_comma"],
                      "kwargs": [{"end_phrase": "That is all for now."}, {}]}
    outcome = ifeval.evaluate_sample("No commas here. That is all for now.", **{
        "instruction_ids": fields["instruction_id_list"], "kwargs": fields["kwargs"]})
    assert outcome["strict"] == [True, True]


@pytest.mark.parametrize("change, message", [
    (lambda t: t[0].update(checker="keywords:nope"), "checker 'keywords:nope' is not a ifeval checker"),
    (lambda t: t[0].update(conflicts=["no.such.type"]), "conflicts with unknown type(s) ['no.such.type']"),
    (lambda t: t.append(dict(t[0])), "every type needs a unique 'id'"),
    (lambda t: t[0].update(text="Use {missing}."), "the text names ['missing'], which are not params"),
])
def test_a_bad_taxonomy_fails_in_one_line_naming_the_file_and_type(tmp_path, change, message):
    types = json.load(open(C.TAXONOMY_PATH))["types"]
    change(types)
    path = tmp_path / "taxonomy.json"
    path.write_text(json.dumps({"types": types}))
    with pytest.raises(ValueError) as error:
        C.load_taxonomy(str(path))
    assert str(path) in str(error.value) and message in str(error.value) and "\n" not in str(error.value)
