"""The embedded teacher's text: template sentences about a topic, shaped to meet stated constraints.

Part of the rule-based stand-in for a teacher LLM (`alignment.synth.embedded`): given constraints stated in the
taxonomy's own wording (read back by `constraints.find_stated`) it builds a response from template sentences that
meets them (`write`), or on purpose ignores one of them (`skip`) so the verifiers have something to reject; it also
generates the reversal recipe's embedded passage pool. The text demonstrates the machinery, not data quality.
"""
from __future__ import annotations

import json
import re
from typing import Sequence

import numpy as np

from alignment.synth import constraints as constraints_lib

_ENGLISH = [
    "{Topic} is worth a closer look.",
    "Many people first notice {topic} in small moments of daily life.",
    "A clear picture of {topic} starts with a few simple facts.",
    "Over time {topic} has shaped how communities live and work.",
    "Looking at {topic} from more than one angle helps the main idea stand out.",
    "Small details about {topic} often explain the larger story.",
    "Anyone can learn about {topic} with patience and curiosity.",
    "The most useful lessons about {topic} come from practice.",
    "Sharing what you know about {topic} helps others learn faster.",
    "Thinking about {topic} calmly makes it easier to decide what matters.",
    "Careful notes about {topic} make the next step easier.",
    "In the end {topic} rewards those who pay attention.",
]
_FOREIGN = {
    "fr": ["Ce sujet mérite une attention particulière dans la vie de tous les jours.",
           "Beaucoup de personnes le découvrent en observant le monde autour de nous.",
           "Il est utile de réfléchir calmement avant de tirer une conclusion.",
           "Les petits détails expliquent souvent une histoire plus grande.",
           "Avec de la patience et de la curiosité chacun peut apprendre davantage."],
    "de": ["Dieses Thema verdient im Alltag besondere Aufmerksamkeit.",
           "Viele Menschen entdecken es, wenn sie die Welt um sich herum beobachten.",
           "Es hilft, in Ruhe nachzudenken, bevor man eine Entscheidung trifft.",
           "Kleine Einzelheiten erklären oft eine größere Geschichte.",
           "Mit Geduld und Neugier kann jeder mehr darüber lernen."],
    "es": ["Este tema merece una atención especial en la vida diaria.",
           "Muchas personas lo descubren al observar el mundo que las rodea.",
           "Conviene pensar con calma antes de sacar una conclusión.",
           "Los pequeños detalles explican a menudo una historia más grande.",
           "Con paciencia y curiosidad cualquiera puede aprender más sobre ello."],
}
# What the stand-in writes for a judged constraint (its stand-in critic looks for the parameter's words).
_JUDGED = {
    "content.semantic.focus": "The focus here stays on {aspect}.",
    "stylistic.tone": "All of this is meant in a {tone} tone.",
    "stylistic.formality": "This answer keeps a {register} register.",
    "stylistic.audience": "This note is written for {audience}.",
    "stylistic.author": "It is told the way {author} would tell it.",
    "linguistic.pragmatic.polite": "Please consider these suggestions kindly.",
    "situation.role_play": "Speaking as {role} I would put it this way.",
    "situation.context": "This is written for a reader who has {context}.",
    "contradictory.priority": "Where the two pull apart {priority} comes first.",
}


def judged_sentence(constraint: dict) -> str:
    """What the stand-in writes for a judged constraint."""
    return _JUDGED[constraint["type"]].format(**{k: constraints_lib.display(v)
                                                 for k, v in constraint["kwargs"].items()})


def sentences(topic: str, count: int, start: int = 0, language: str = "") -> list[str]:
    """`count` template sentences about `topic` (in `language`'s bank when one is given), from `start` on."""
    bank = _FOREIGN.get(language) or _ENGLISH
    chosen = [bank[(start + i) % len(bank)] for i in range(count)]
    return [s.format(topic=topic, Topic=topic[:1].upper() + topic[1:]) for s in chosen]


def _groups(items: list[str], count: int) -> list[list[str]]:
    """`items` in `count` consecutive non-empty groups (as even as possible)."""
    count = max(1, min(count, len(items)))
    size, extra = divmod(len(items), count)
    groups, start = [], 0
    for index in range(count):
        end = start + size + (index < extra)
        groups.append(items[start:end])
        start = end
    return groups


def _body(lines: list[str], c: dict) -> str:
    """The main text from its sentences, in the one layout the constraints ask for."""
    join = " ".join
    if "format.specialized.json" in c:
        return json.dumps({"answer": join(lines)}, ensure_ascii=False)
    if "format.bespoke.two_responses" in c:
        second = join(lines[1:] + lines[:1]) if len(lines) > 1 else f"In short: {join(lines)}"
        return join(lines) + "\n******\n" + second
    if "numerical.list_items" in c:
        count = c["numerical.list_items"]["num_bullets"]
        intro, points = lines[:-count] if count < len(lines) else [], lines[-count:]
        return "\n".join(([join(intro)] if intro else []) + [f"* {p}" for p in points])
    if "example.pattern" in c:
        label = c["example.pattern"]["label"]
        return "\n".join(f"{label} {i + 1}: {s}" for i, s in enumerate(lines))
    if "format.bespoke.table" in c:
        return "| Point | Detail |\n| --- | --- |\n" + "\n".join(f"| {i + 1} | {s} |" for i, s in enumerate(lines))
    if "numerical.paragraphs" in c:
        return "\n***\n".join(join(g) for g in _groups(lines, c["numerical.paragraphs"]["num_paragraphs"]))
    if "numerical.nth_paragraph_first_word" in c:
        k = c["numerical.nth_paragraph_first_word"]
        groups = _groups(lines, k["num_paragraphs"])
        if k["nth_paragraph"] <= len(groups):
            first = groups[k["nth_paragraph"] - 1]
            first[0] = f"{k['first_word'].capitalize()} {first[0][:1].lower()}{first[0][1:]}"
        return "\n\n".join(join(g) for g in groups)
    if "format.fundamental.sections" in c:
        k = c["format.fundamental.sections"]
        return "\n\n".join(f"{k['section_spliter']} {i + 1}\n{join(g)}"
                           for i, g in enumerate(_groups(lines, k["num_sections"])))
    return join(lines)


def _required(topic: str, c: dict) -> list[str]:
    """Sentences some constraints need in the body (keywords, an example, placeholders, ...)."""
    extra = []
    if "content.lexical.include_keywords" in c:
        words = c["content.lexical.include_keywords"]["keywords"]
        extra.append("It also brings to mind " + " and ".join(f"the {w}" for w in words) + ".")
    if "content.lexical.keyword_frequency" in c:
        k = c["content.lexical.keyword_frequency"]
        extra.append(" and ".join([f"{k['keyword']} counts"] * k["frequency"]).capitalize() + ".")
    if "content.element.example_phrase" in c:
        extra.append(f"For example {topic} shows up in ordinary routines at home and at work.")
    if "content.element.placeholders" in c:
        slots = ["[address]", "[phone number]", "[name]"][:c["content.element.placeholders"]["num_placeholders"]]
        extra.append("You can reach the team at " + " or ".join(slots) + ".")
    if "linguistic.case.capital_words" in c:
        words = ["KEY", "CLEAR", "USEFUL", "SIMPLE"][:c["linguistic.case.capital_words"]["capital_frequency"]]
        extra.append(f"This is a {' '.join(words)} point.")
    extra += [judged_sentence({"type": t, "kwargs": c[t]}) for t in _JUDGED if t in c]
    return extra


def _compose(topic: str, request: str, c: dict, count: int) -> str:
    language = c.get("linguistic.multilingual.response_language", {}).get("language", "")
    required = _required(topic, c)
    filler = sentences(topic, max(count, 1), language=language)
    forbidden = c.get("content.lexical.forbidden_words", {}).get("forbidden_words", [])
    filler = [s for s in filler if not any(re.search(rf"\b{re.escape(w)}\b", s, re.IGNORECASE) for w in forbidden)]
    lines = filler[:1] + required + filler[1:]
    if "format.fundamental.highlights" in c:
        for i in range(min(c["format.fundamental.highlights"]["num_highlights"], len(lines))):
            lines[i] = f"*{lines[i]}*"
    text = _body(lines, c)
    if "format.fundamental.title" in c:
        text = f"<<{topic[:1].upper() + topic[1:]}>>\n{text}"
    if "rule.start_word" in c:
        text = f"{c['rule.start_word']['word']}, here is my answer.\n{text}"
    if "rule.repeat_prompt" in c:
        text = f"{request}\n\n{text}"
    if "rule.constrained_response" in c:
        text += "\nMy answer is yes."
    if "content.element.postscript" in c:
        text += f"\n\n{c['content.element.postscript']['postscript_marker']} Thank you for reading."
    if "rule.end_phrase" in c:
        text += f"\n{c['rule.end_phrase']['end_phrase']}"
    if "linguistic.syntactic.no_comma" in c:
        text = text.replace(",", "")
    if "linguistic.case.lowercase" in c:
        text = text.lower()
    if "linguistic.case.uppercase" in c:
        text = text.upper()
    if "format.fundamental.quotation" in c:
        text = f'"{text}"'
    return text


_LENGTH = ("numerical.words", "numerical.sentences", "numerical.characters")


def write(taxonomy: constraints_lib.Taxonomy, topic: str, request: str, stated: Sequence[dict],
          skip: str = "") -> str:
    """A response about `topic` meeting the stated constraints except type `skip`; the number of sentences is
    the one nearest four that meets the length constraints (checked with the real checkers)."""
    c = {s["type"]: s["kwargs"] for s in stated if s["type"] != skip}
    lengths = [s for s in stated if s["type"] in _LENGTH and s["type"] != skip]
    best = None
    for count in sorted(range(1, 25), key=lambda n: abs(n - 4)):
        text = _compose(topic, request, c, count)
        best = best or text
        if all(constraints_lib.check(taxonomy, s, text) for s in lengths):
            return text
    return best


# The layouts of the embedded passage pool: what a passage's measurable attributes can be.
LAYOUTS = ("format.fundamental.title", "numerical.list_items", "numerical.paragraphs", "format.fundamental.sections",
           "format.fundamental.highlights", "content.element.postscript", "format.fundamental.quotation",
           "linguistic.case.lowercase", "linguistic.syntactic.no_comma", "content.element.placeholders",
           "format.bespoke.table", "example.pattern", "format.specialized.json",
           "linguistic.multilingual.response_language", "rule.end_phrase")
# Each English sentence as a regex capturing its topic (words and spaces), mid-sentence topics first.
_TOPIC = [re.compile(re.escape(t).replace(r"\{Topic\}", "((?:[A-Za-z']+ )*?[A-Za-z']+)")
                     .replace(r"\{topic\}", "((?:[A-Za-z']+ )*?[A-Za-z']+)"), re.IGNORECASE)
          for t in sorted(_ENGLISH, key=lambda t: t.startswith("{Topic}"))]


def topic_of(text: str) -> str:
    """The topic of a text built from the English sentences ('' when none is found)."""
    for regex in _TOPIC:
        match = regex.search(text)
        if match:
            return match.group(1).strip("*").lower()
    return ""


def language_of(text: str) -> str:
    """'fr' / 'de' / 'es' when the text holds a sentence of that bank, else ''."""
    lowered = text.lower()
    return next((code for code, bank in _FOREIGN.items() if any(s.lower()[:30] in lowered for s in bank)), "")


def quality(text: str) -> float:
    """A surface quality score in [0, 10]: ten times the share of distinct words (repetitive text scores low)."""
    words = re.findall(r"\w+", text.lower())
    return round(10 * len(set(words)) / len(words), 2) if words else 0.0


def passages(taxonomy: constraints_lib.Taxonomy, topics: Sequence[str], num: int, seed: int,
             low_quality_share: float = 0.1) -> list[dict]:
    """`num` passages {id, text, quality}: each about a topic, in up to three compatible layouts; a
    `low_quality_share` of them one sentence repeated (they score low and a quality threshold drops them)."""
    rng = np.random.default_rng(seed)
    layouts = [t for t in LAYOUTS if t in taxonomy.types]
    pool = []
    for index in range(num):
        subject = topics[index % len(topics)]
        if rng.random() < low_quality_share:
            text = " ".join(sentences(subject, 1, int(rng.integers(len(_ENGLISH)))) * 6)
        else:
            chosen: list[str] = []
            for type_id in rng.permutation(layouts)[:int(rng.integers(1, 4)) * 2]:
                if len(chosen) < 3 and not any(taxonomy.conflict(str(type_id), c) for c in chosen):
                    chosen.append(str(type_id))
            stated = [{"type": t, "kwargs": {n: constraints_lib.kwarg_value(v[int(rng.integers(len(v)))], "")
                                             for n, v in taxonomy.types[t].params.items()}} for t in chosen]
            text = write(taxonomy, subject, "", stated)
        pool.append({"id": f"passage-{index}", "text": text, "quality": quality(text)})
    return pool
