"""Recipe 3 (report 4.1c): response reversal. A quality-scored passage becomes the response, and the teacher writes
the prompt it answers, with constraints that encode the passage's attributes.

Passages at or below `min_quality` are dropped. The attributes a checker can measure (length, layout, case,
punctuation, markers, language: `measure`) are found with the IFEval-style checkers. The teacher replies with the
prompt and the constraints it states as JSON; a reply passes when every stated constraint holds for the passage
(checked, not taken on the teacher's word), is stated in the prompt's text, and every measured attribute is
covered; then the inspector (the critic endpoint) scores how well the prompt asks for this passage (topic, purpose,
style). Anything missing goes back as a revision request, for up to `max_rounds` rounds.
"""
from __future__ import annotations

import re

import numpy as np

from alignment.config import Field, positive
from alignment.pas.teacher import topic
from alignment.rewards import ifeval
from alignment.synth import constraint_expansion, embedded_text, pools
from alignment.synth import constraints as constraints_lib
from alignment.synth.driver import Result, Session, parse_json_reply, sft_record

NAME = "reversal"
FIELDS = {
    "num_items": positive(),
    "min_quality": Field(low=0, high=10),
    "max_rounds": positive(),
    "min_score": Field(low=0, high=10),
}
# The attributes `measure` finds, as constraint types of the taxonomy.
MEASURED = ("numerical.words", "numerical.list_items", "numerical.paragraphs", "format.fundamental.title",
            "format.fundamental.highlights", "format.fundamental.sections", "format.specialized.json",
            "format.fundamental.quotation", "content.element.postscript", "linguistic.case.lowercase",
            "linguistic.syntactic.no_comma", "content.element.placeholders", "format.bespoke.table", "example.pattern",
            "format.bespoke.two_responses", "linguistic.multilingual.response_language", "rule.end_phrase")
INSPECT_SYSTEM = (
    "You inspect a prompt written for a given response. Score from 1 to 10 how well the prompt asks for exactly this "
    "response (its topic, purpose, style and every attribute) and list what to revise. Reply with JSON only: "
    '{"score": 1 to 10, "verdict": "accept" or "reject", "failures": [what to revise]}.')


def reverse_system(taxonomy: constraints_lib.Taxonomy) -> str:
    """The teacher's instructions, listing the constraint types it may state (ids, parameters, wording)."""
    lines = "\n".join(f"- {t} ({', '.join(taxonomy.types[t].params) or 'no parameters'}): {taxonomy.types[t].text}"
                      for t in MEASURED if t in taxonomy.types)
    return ("You write the user prompt that a given response answers best. State the response's topic, purpose and "
            "style, and add a constraint for each of its measurable attributes, worded as below:\n" + lines +
            '\nReply with JSON only: {"prompt": the prompt, "constraints": [{"type": a type id above, "kwargs": its '
            'parameters}]}.')


def _count(regex: str, text: str) -> int:
    return len(re.findall(regex, text, flags=re.MULTILINE))


def measure(taxonomy: constraints_lib.Taxonomy, text: str, language: str) -> list[dict]:
    """The passage's measurable attributes as constraints that hold for it (each checked); `language` is its
    language code when not English ('' otherwise)."""
    found = []
    add = lambda type_id, **kwargs: found.append({"type": type_id, "kwargs": kwargs})  # noqa: E731
    add("numerical.words", relation="less than", num_words=(ifeval.count_words(text) // 10 + 1) * 10)
    bullets = _count(r"^\s*\*[^\*].*$", text) + _count(r"^\s*-.*$", text)
    if bullets:
        add("numerical.list_items", num_bullets=bullets)
    if "***" in text and "******" not in text:
        add("numerical.paragraphs", num_paragraphs=len([p for p in re.split(r"\s?\*\*\*\s?", text) if p.strip()]))
    if ifeval.title(text):
        add("format.fundamental.title")
    highlights = len([h for h in re.findall(r"\*[^\n\*]*\*", text) if h.strip("*").strip()])
    if highlights:
        add("format.fundamental.highlights", num_highlights=highlights)
    sections = re.findall(r"^(SECTION|PART) \d+", text, flags=re.MULTILINE)
    if sections:
        add("format.fundamental.sections", section_spliter=sections[0], num_sections=len(sections))
    for type_id, holds in (("format.specialized.json", ifeval.json_format(text)),
                           ("format.fundamental.quotation", ifeval.quotation(text)),
                           ("format.bespoke.two_responses", "******" in text and ifeval.two_responses(text)),
                           ("format.bespoke.table", constraints_lib.RULES["markdown_table"](text)),
                           ("linguistic.case.lowercase", not language and text.islower()),
                           ("linguistic.syntactic.no_comma", "," not in text and ifeval.count_words(text) >= 10)):
        if holds:
            add(type_id)
    lowered = text.lower()
    marker = "P.P.S" if "p.p.s" in lowered else "P.S." if "p.s." in lowered else ""
    if marker:
        add("content.element.postscript", postscript_marker=marker)
    if _count(r"\[.*?\]", text):
        add("content.element.placeholders", num_placeholders=len(re.findall(r"\[.*?\]", text)))
    label = re.search(r"^\s*(\w+) 1:", text, flags=re.MULTILINE)
    if label:
        add("example.pattern", label=label.group(1))
    if language:
        add("linguistic.multilingual.response_language", language=language)
    ending = text.strip().strip('"')
    for phrase in taxonomy.types["rule.end_phrase"].params["end_phrase"] if "rule.end_phrase" in taxonomy.types else ():
        if ending.lower().endswith(phrase.lower()):
            add("rule.end_phrase", end_phrase=phrase)
    return [c for c in found if c["type"] in taxonomy.types and constraints_lib.check(taxonomy, c, text)]


def _language(text: str) -> str:
    """The passage's language code by langdetect when it is not English, else ''."""
    import langdetect

    langdetect.DetectorFactory.seed = 0  # langdetect samples internally; fixed for reproducible results
    try:
        code = langdetect.detect(text)
    except langdetect.LangDetectException:
        return ""
    return "" if code == "en" else code


def _measured(taxonomy: constraints_lib.Taxonomy, text: str) -> list[dict]:
    return measure(taxonomy, text, _language(text))


def items(options, seed: int, session: Session) -> tuple[list[dict], dict]:
    """Passages above `min_quality`: a JSONL of {text, quality, id?} or the embedded pool (template passages in
    random layouts, a tenth of them repetitive), with their measured attributes."""
    if options.passages == pools.EMBEDDED:
        seeds = pools.seed_prompts(pools.EMBEDDED, 40, "writing,knowledge", seed)
        topics = [topic(r["prompt"], r["category"]) for r in seeds]
        passages = embedded_text.passages(taxonomy(options), topics, options.num_items, seed)
    else:
        records = pools.read_records(options.passages, {"text": str, "quality": (int, float)})
        order = np.random.default_rng(seed).permutation(len(records))[:options.num_items]
        passages = [{"id": str(records[i].get("id", records[i]["where"])), "text": records[i]["text"],
                     "quality": float(records[i]["quality"])} for i in sorted(order)]
    kept = [p for p in passages if p["quality"] > options.min_quality]
    types = taxonomy(options)
    measured = session.map(lambda p: session.on_main(_measured, types, p["text"]), kept)
    work = [{**p, "attributes": m} for p, m in zip(kept, measured)]
    return work, {"low_quality": len(passages) - len(kept)}


def taxonomy(options) -> constraints_lib.Taxonomy:
    return constraint_expansion.taxonomy(options)


def reply_failures(taxonomy: constraints_lib.Taxonomy, passage: str, attributes: list[dict], reply: str
                   ) -> tuple[list[str], str, list[dict]]:
    """(failed checks, prompt, stated constraints) of a teacher reply."""
    parsed = parse_json_reply(reply)
    stated = parsed.get("constraints") if isinstance(parsed, dict) else None
    prompt = parsed.get("prompt") if isinstance(parsed, dict) else None
    if not isinstance(prompt, str) or not prompt.strip() or not isinstance(stated, list) or not all(
            isinstance(c, dict) and c.get("type") in MEASURED and c.get("type") in taxonomy.types
            and isinstance(c.get("kwargs", {}), dict) for c in stated):
        return ["reversal:unreadable_reply"], "", []
    stated = [{"type": c["type"], "kwargs": c.get("kwargs", {})} for c in stated]
    failures = []
    for constraint in stated:
        try:
            holds = constraints_lib.check(taxonomy, constraint, passage)
        except (TypeError, ValueError, KeyError):
            failures.append(f"reversal:bad_parameters:{constraint['type']}")
            continue
        if not holds:
            failures.append(f"reversal:false_for_passage:{constraint['type']}")
    if not failures:
        failures += [f"reversal:unstated:{t}" for t in constraints_lib.unstated(taxonomy, prompt, stated)]
    covered = {c["type"] for c in stated}
    failures += [f"reversal:missing_attribute:{a['type']}" for a in attributes if a["type"] not in covered]
    return failures, prompt.strip(), stated


def synthesize(item: dict, session: Session, options) -> Result:
    types = taxonomy(options)
    result = Result(item["id"], facts={"attributes": len(item["attributes"])})
    messages = [{"role": "system", "content": reverse_system(types)},
                {"role": "user", "content": f"Response:\n{item['text']}"}]
    for round_ in range(options.max_rounds):
        reply = session.ask(messages, (item["id"], "reverse", round_))
        failures, prompt, stated = session.on_main(reply_failures, types, item["text"], item["attributes"], reply)
        if not failures:
            inspect = [{"role": "system", "content": INSPECT_SYSTEM},
                       {"role": "user", "content": f"Response:\n{item['text']}\n\nPrompt:\n{prompt}"}]
            failures, verdict = session.judge(inspect, (item["id"], "inspect", round_))
            score = verdict.get("score") if isinstance(verdict, dict) else None
            if isinstance(score, (int, float)) and score < options.min_score:
                failures = failures or ("critic:low_score",)
            result.facts["score"] = score
        if not failures:
            result.facts["rounds"] = round_ + 1
            result.records.append(sft_record(
                item["id"], NAME, "instruction_following",
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": item["text"]}],
                constraints=stated, quality=item["quality"], **constraints_lib.ifeval_fields(types, stated)))
            return result
        result.reject(failures)
        revisions = "\n".join(f"- {f}" for f in failures)
        messages = messages + [{"role": "assistant", "content": reply},
                               {"role": "user", "content": f"Revise the prompt. Problems found:\n{revisions}\n"
                                                           "Reply in the same JSON format."}]
    return result.drop("prompt_rejected")


def finish(results: list[Result], options, seed: int, workdir: str) -> dict:
    kept = [r for r in results if r.records]
    rounds = [r.facts["rounds"] for r in kept]
    scores = [r.facts["score"] for r in kept if isinstance(r.facts.get("score"), (int, float))]
    return {"rounds_to_accept": {str(k): rounds.count(k) for k in sorted(set(rounds))},
            "mean_inspector_score": float(np.mean(scores)) if scores else None,
            "attributes_per_passage": float(np.mean([r.facts.get("attributes", 0) for r in results] or [0.0]))}
