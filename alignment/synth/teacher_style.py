"""Recipe 4 (report 4.1d): teacher-style responses to complex instructions.

The teacher answers as a patient teacher would, in five headed parts: the user's intent, the thought process, an
analogy, the general principles, then the answer. A response is kept when the five parts are all there, in order,
each with content (the analogy compares, the principles are two to four lines, the answer has at least
`min_answer_words` words) and the critic finds that it answers the instruction.
"""
from __future__ import annotations

import re

from alignment.config import positive
from alignment.synth import pools
from alignment.synth.driver import VERDICT_FORMAT, Result, Session, generate_verified, sft_record

NAME = "teacher_style"
FIELDS = {"num_items": positive(), "attempts": positive(), "min_answer_words": positive()}
SECTIONS = ("Intent", "Thought process", "Analogy", "Principles", "Answer")
TEACHER_SYSTEM = (
    "Answer like a patient teacher, in five parts, each starting on its own line with its heading, in this order: "
    "'Intent:' (what the user needs and why), 'Thought process:' (how to approach it, step by step), 'Analogy:' "
    "(one comparison that makes the idea click), 'Principles:' (two to four general principles, one per line "
    "starting with '- '), 'Answer:' (the complete answer).")
CHECK_SYSTEM = ("You check a teacher-style response to an instruction. Reject it when it does not answer the "
                "instruction, or when its intent, analogy or principles do not fit the instruction. " + VERDICT_FORMAT)
_COMPARES = re.compile(r"\b(like|as if|similar to|just as|imagine|think of|compare)\b", re.IGNORECASE)


def sections(response: str) -> dict[str, str] | None:
    """{heading: its text} when every heading starts a line exactly once, in order; else None."""
    starts = []
    for heading in SECTIONS:
        found = [m for m in re.finditer(rf"^\s*\**{re.escape(heading)}\**:", response, re.MULTILINE)]
        if len(found) != 1:
            return None
        starts.append(found[0])
    if [m.start() for m in starts] != sorted(m.start() for m in starts):
        return None
    ends = [m.start() for m in starts[1:]] + [len(response)]
    return {h: response[m.end():end].strip() for h, m, end in zip(SECTIONS, starts, ends)}


def structure_failures(response: str, min_answer_words: int) -> list[str]:
    parts = sections(response)
    if parts is None:
        return ["structure:sections_missing_or_out_of_order"]
    failures = [f"structure:empty:{h.lower().replace(' ', '_')}" for h, text in parts.items() if not text]
    if parts["Analogy"] and not _COMPARES.search(parts["Analogy"]):
        failures.append("structure:analogy_compares_nothing")
    principles = [line for line in parts["Principles"].splitlines() if line.strip().startswith("- ")]
    if not 2 <= len(principles) <= 4:
        failures.append("structure:principles_not_two_to_four")
    if len(parts["Answer"].split()) < min_answer_words:
        failures.append("structure:answer_too_short")
    return failures


def items(options, seed: int, session: Session) -> tuple[list[dict], dict]:
    return pools.seed_prompts(options.seeds, options.num_items, options.categories, seed), {}


def synthesize(item: dict, session: Session, options) -> Result:
    result = Result(item["id"])
    messages = [{"role": "system", "content": TEACHER_SYSTEM}, {"role": "user", "content": item["prompt"]}]

    def verify(reply: str) -> list[str]:
        failures = structure_failures(reply, options.min_answer_words)
        if failures:
            return failures
        request = f"Instruction:\n{item['prompt']}\n\nResponse:\n{reply}"
        return list(session.verdict([{"role": "system", "content": CHECK_SYSTEM},
                                     {"role": "user", "content": request}], (item["id"], "check", reply)))

    response = generate_verified(session, result, messages, verify, options.attempts, (item["id"], "answer"))
    if response is None:
        return result.drop("response_rejected")
    result.records.append(sft_record(item["id"], NAME, item["category"],
                                     messages[1:] + [{"role": "assistant", "content": response}]))
    return result
