"""Teacher-style responses: the structure check on hand-made responses, and a run over HTTP."""
import json

import pytest

from alignment import stages
from alignment.config import config_path, load_config_file
from alignment.synth import teacher_style as recipe

GOOD = ("Intent: You want to know why bread rises.\n\nThought process: First look at yeast, then at gas, then at heat."
        "\n\nAnalogy: Dough is like a balloon that yeast keeps blowing up.\n\nPrinciples:\n- Living things make gas.\n"
        "- Gas expands when warm.\n\nAnswer: Yeast eats sugar in the dough and gives off carbon dioxide, which the "
        "gluten traps in bubbles, so the dough swells and the oven's heat expands it further.")


@pytest.mark.parametrize("response, failures", [
    (GOOD, []),
    (GOOD.replace("Analogy: Dough is like a balloon that yeast keeps blowing up.\n\n", ""),
     ["structure:sections_missing_or_out_of_order"]),
    (GOOD.split("\n\nAnswer:")[0].replace("Intent:", "Answer: short.\n\nIntent:"),
     ["structure:sections_missing_or_out_of_order"]),
    (GOOD.replace("like a balloon that yeast keeps blowing up", "a balloon"), ["structure:analogy_compares_nothing"]),
    (GOOD.replace("- Gas expands when warm.\n", ""), ["structure:principles_not_two_to_four"]),
    (GOOD.split("Answer:")[0] + "Answer: It rises.", ["structure:answer_too_short"]),
    (GOOD.replace("Intent: You want to know why bread rises.", "Intent:"), ["structure:empty:intent"]),
])
def test_structure_check_on_hand_made_responses(response, failures):
    assert recipe.structure_failures(response, min_answer_words=20) == failures


def test_teacher_style_end_to_end_over_http(tmp_path):
    config = load_config_file(config_path("synth/teacher_style"))
    config.teacher_style.num_items = 40
    config.teacher.flaw_rate = 0.4
    summary = stages.run("synth", config, str(tmp_path))
    assert summary["records"] > 30 and summary["pairs"] > 0 and summary["critic_calls"] >= summary["records"]
    assert set(summary["rejected"]) <= {"structure:sections_missing_or_out_of_order",
                                        "structure:principles_not_two_to_four", "critic:off_topic"}
    for line in open(tmp_path / "sft.jsonl"):
        assert recipe.structure_failures(json.loads(line)["messages"][-1]["content"], 20) == []
