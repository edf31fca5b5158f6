"""The PAS critique: each listed failure kind is rejected on crafted cases, good complements pass, and the critic's
replies are parsed strictly (an unreadable critic never lets a complement through)."""
import json

import pytest

from alignment.pas import critique
from alignment.pas.data import load_seeds
from alignment.pas.template import FAILURES

MATH = "A shop sells pens for 3 dollars each. How much do 4 pens cost?"
POEM = "Write a short poem about the sea."
STORY = "Write a short story about space travel for children in a friendly voice."

# (prompt, complement, reference answer, the failure the rules must name)
CRAFTED = [
    (POEM, "Write a detailed, comprehensive poem with long, elaborate stanzas.", None, "conflicts_with_intent"),
    ("Describe your city without bullet points.", "Use bullet points for each landmark.", None,
     "conflicts_with_intent"),
    ("Explain recursion in English.", "Explain it in French with an example.", None, "conflicts_with_intent"),
    (POEM, " ".join(["Mention the tides, the colours, the wind and the sailors of the sea."] * 6), None,
     "over_extends"),
    (MATH, "The answer is 12 dollars.", "12", "answers_prompt"),
    (MATH, "Multiply 3 by 4, which gives 12 dollars.", "12", "answers_prompt"),
    ("Write a Python function that reverses a string.", "```python\ndef f(s): return s[::-1]\n```", None,
     "answers_prompt"),
    (POEM, "You must rhyme. You must use ten stanzas. Always cite sources. Never use metaphors. Make sure to add "
           "a title.", None, "excessive_demands"),
    (MATH, "Montre chaque étape du calcul et donne le coût final en dollars à la dernière ligne.", "12",
     "switches_language"),
    (MATH, "显示每一步计算并在最后一行给出最终价格。", "12", "switches_language"),
    (STORY, "Erzähle die Geschichte mit einem Anfang, einem Wendepunkt und einem Ende für Kinder.", None,
     "switches_language"),
    ("Solve for x: 2x + 8 = 12.", "Réponds à la question sur le sujet avec des détails précis et une structure "
                                  "claire, en français.", None, "switches_language"),
]


@pytest.mark.parametrize("prompt, complement, reference, failure", CRAFTED,
                         ids=[f"{c[3]}-{i}" for i, c in enumerate(CRAFTED)])
def test_rules_reject_each_failure_kind(prompt, complement, reference, failure):
    assert failure in FAILURES
    found = critique.rule_failures(prompt, complement, reference)
    assert failure in found, found
    verdict = critique.critique(prompt, complement, ask=lambda m: pytest.fail("rules decide; the critic is not asked"),
                                reference=reference)
    assert not verdict.accepted and failure in verdict.failures and verdict.source == "rules"


def test_every_failure_kind_is_covered():
    assert {c[3] for c in CRAFTED} == set(FAILURES)


GOOD = [
    (MATH, "Show each calculation step, check the multiplication, and state the final cost in dollars on the "
           "last line.", "12"),
    (POEM, "Give the poem a clear mood and vivid images of the sea, in three short stanzas with a memorable ending.",
     None),
    ("Give a short overview of inflation.", "Explain it in plain language, with one everyday example, and keep "
                                            "it brief.", None),
    ("写一首关于大海的诗。", "描写大海的景色和情感，语言生动，结构清晰。", None),
]


@pytest.mark.parametrize("prompt, complement, reference", GOOD)
def test_rules_accept_good_complements(prompt, complement, reference):
    assert critique.rule_failures(prompt, complement, reference) == ()


def test_shipped_seed_examples_pass_the_rules():
    for examples in load_seeds().values():
        for example in examples:
            assert critique.rule_failures(example["prompt"], example["complement"]) == (), example


def test_short_prompts_take_the_default_language():
    prompt = "Solve for x: 2x + 8 = 12."  # langdetect calls this Danish
    english = "Isolate x one step at a time, show every operation on both sides, and check the solution."
    assert not critique.switches_language(prompt, english)
    assert critique.switches_language("Écris un poème sur la mer.", english,
                                      critique.Rules(default_language="fr"))
    assert not critique.switches_language("Écris un poème sur la mer.", english, critique.Rules(default_language=""))


def test_numbers_of_the_prompt_are_not_an_answer():
    assert not critique.answers_prompt(MATH, "Use the price of 3 dollars and the 4 pens in the calculation.", "12")


@pytest.mark.parametrize("reply, accepted, failures", [
    ('{"verdict": "accept", "failures": []}', True, ()),
    ('Sure. {"verdict": "REJECT", "failures": ["answers_prompt"]} Done.', False, ("answers_prompt",)),
    ('{"verdict": "reject", "failures": ["too vague"]}', False, ("other:too vague",)),
    ('{"verdict": "reject"}', False, ("other:unspecified",)),
])
def test_parse_critic_reply(reply, accepted, failures):
    verdict = critique.parse_critic_reply(reply)
    assert verdict.accepted == accepted and verdict.failures == failures and verdict.source == "critic"


@pytest.mark.parametrize("reply", ["looks fine to me", '{"verdict": "maybe"}', "{not json}", "[1, 2]"])
def test_unreadable_critic_reply_is_none(reply):
    assert critique.parse_critic_reply(reply) is None


def test_critic_consulted_after_rules_and_unparseable_rejects():
    good = GOOD[0]
    asked = []

    def critic(messages):
        asked.append(messages)
        return "I cannot decide"

    verdict = critique.critique(good[0], good[1], critic, good[2], attempts=3)
    assert not verdict.accepted and verdict.failures == ("critic_unparseable",) and len(asked) == 3
    assert asked[0][0]["role"] == "system" and good[1] in asked[0][1]["content"]

    rejecting = lambda m: json.dumps({"verdict": "reject", "failures": ["conflicts_with_intent"]})
    verdict = critique.critique(good[0], good[1], rejecting, good[2])
    assert not verdict.accepted and verdict.failures == ("conflicts_with_intent",) and verdict.source == "critic"
    accepting = lambda m: json.dumps({"verdict": "accept", "failures": []})
    assert critique.critique(good[0], good[1], accepting, good[2]).accepted
