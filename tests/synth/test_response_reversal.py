"""Response reversal: attributes measured on hand-made passages, the checks on the teacher's prompt (every stated
constraint true of the passage and stated in the prompt, every measured attribute covered), and a run over HTTP."""
import json

from alignment import stages
from alignment.config import config_path, load_config_file
from alignment.rewards import ifeval
from alignment.synth import constraints as C
from alignment.synth import response_reversal as recipe

TAXONOMY = C.load_taxonomy()
PASSAGE = ("<<rain at night>>\n* the street shines under the lamps.\n* a cat waits by the door.\n"
           "* the gutters sing until morning.\n\np.s. bring an umbrella.")


def test_measure_finds_the_attributes_that_hold():
    found = {c["type"]: c["kwargs"] for c in recipe.measure(TAXONOMY, PASSAGE, "")}
    assert found == {"numerical.words": {"relation": "less than", "num_words": 30},
                     "numerical.list_items": {"num_bullets": 3},
                     "format.fundamental.title": {},
                     "content.element.postscript": {"postscript_marker": "P.S."},
                     "linguistic.case.lowercase": {},
                     "linguistic.syntactic.no_comma": {}}
    assert ifeval.count_words(PASSAGE) < 30
    table = "| a | b |\n| --- | --- |\n| 1 | 2 |"
    assert {c["type"] for c in recipe.measure(TAXONOMY, table, "")} >= {"format.bespoke.table"}
    assert {"type": "linguistic.multilingual.response_language", "kwargs": {"language": "fr"}} in recipe.measure(
        TAXONOMY, "Ce sujet mérite une attention particulière dans la vie de tous les jours.", "fr")


def _reply(prompt, stated):
    return json.dumps({"prompt": prompt, "constraints": stated})


def test_a_prompt_passes_only_when_its_constraints_hold_are_stated_and_cover_the_passage():
    attributes = recipe.measure(TAXONOMY, PASSAGE, "")
    good = "Write a short note about rain at night. " + " ".join(C.state(TAXONOMY, c) for c in attributes)
    assert recipe.reply_failures(TAXONOMY, PASSAGE, attributes, _reply(good, attributes))[0] == []
    wrong = [dict(c, kwargs={"relation": "less than", "num_words": 10}) if c["type"] == "numerical.words" else c
             for c in attributes]
    assert recipe.reply_failures(TAXONOMY, PASSAGE, attributes, _reply(good.replace("30", "10"), wrong))[0] == [
        "reversal:false_for_passage:numerical.words"]
    unsaid = good.replace("postscript starting with P.S.", "note")
    assert recipe.reply_failures(TAXONOMY, PASSAGE, attributes, _reply(unsaid, attributes))[0] == [
        "reversal:unstated:content.element.postscript"]
    missing = [c for c in attributes if c["type"] != "format.fundamental.title"]
    assert recipe.reply_failures(TAXONOMY, PASSAGE, attributes, _reply(good, missing))[0] == [
        "reversal:missing_attribute:format.fundamental.title"]
    bad_kwargs = [{"type": "numerical.words", "kwargs": {"count": 3}}]
    assert "reversal:bad_parameters:numerical.words" in recipe.reply_failures(
        TAXONOMY, PASSAGE, attributes, _reply(good, bad_kwargs))[0]
    for reply in ("Write about rain.", _reply(good, [{"type": "stylistic.tone", "kwargs": {}}]), "[1, 2]"):
        assert recipe.reply_failures(TAXONOMY, PASSAGE, attributes, reply)[0] == ["reversal:unreadable_reply"]


def test_reversal_end_to_end_over_http(tmp_path):
    config = load_config_file(config_path("synth/reversal"))
    config.reversal.num_items = 40
    config.teacher.flaw_rate = 0.4
    summary = stages.run("synth", config, str(tmp_path))
    assert summary["filtered"]["low_quality"] > 0 and summary["items"] == 40 - summary["filtered"]["low_quality"]
    assert any(k.startswith("reversal:") for k in summary["rejected"])
    assert any(int(rounds) > 1 for rounds in summary["rounds_to_accept"])  # revisions rescued some prompts
    for line in open(tmp_path / "sft.jsonl"):
        record = json.loads(line)
        passage = record["messages"][1]["content"]
        assert all(ifeval.evaluate_sample(passage, record["instruction_id_list"], record["kwargs"])["strict"])
        covered = {c["type"] for c in record["constraints"]}
        assert {a["type"] for a in recipe.measure(TAXONOMY, passage, recipe._language(passage))} <= covered
