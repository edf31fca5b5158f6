"""The critique that filters PAS complements: deterministic rule checks, then an LLM critic.

The rules catch what text alone decides (a switched language or script, a complement far longer than the ~30
words the paper targets, a pile of demands, a stated answer, a constraint that contradicts the prompt's own);
the critic endpoint judges the rest. A complement is kept only when both accept it. Every rejection carries the
names of its failures (`template.FAILURES`), so a run can report how many were rejected for what.
"""
from __future__ import annotations

import dataclasses
import json
import re
import threading
from typing import Callable

from alignment.pas.template import FAILURES, critic_messages

Ask = Callable[[list[dict]], str]  # messages -> the endpoint's reply text


@dataclasses.dataclass(frozen=True)
class Rules:
    max_words: int = 60  # longer complements over-extend (the paper aims at about 30 words)
    max_demands: int = 4  # more demand clauses than this is excessive
    min_words_for_language_id: int = 8  # shorter texts are too short for reliable language identification
    min_language_probability: float = 0.95  # both texts must be identified at least this surely
    default_language: str = "en"  # the language of prompts too short to identify ('' = do not guess)


@dataclasses.dataclass
class Verdict:
    accepted: bool
    failures: tuple[str, ...] = ()
    source: str = "rules"  # rules | critic | critic_unparseable


_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?", re.UNICODE)
_DEMAND = re.compile(r"\b(must|should|ensure|make sure|be sure|include|always|at least|required?|need to|"
                     r"do not|don't|never|avoid|list|provide|add|use|cite|give)\b", re.IGNORECASE)
_ANSWER = re.compile(r"\b(the (final )?answer is|answer:|the result is|the solution is|equals?\s+-?\d|"
                     r"=\s*-?\d[\d,.]*\s*$|here is the (code|answer|story|poem|essay))", re.IGNORECASE | re.MULTILINE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")

# (prompt pattern, complement pattern): a complement matching the second contradicts a prompt matching the first.
_CONFLICTS = [
    (r"\b(brief|briefly|short|concise|one sentence|in \d+ words|few words|one line)\b",
     r"\b(detailed|in depth|in-depth|comprehensive|at least \d{3,}|long|elaborate|extensive|thorough)\b"),
    (r"\b(detailed|in depth|comprehensive|thorough|at length)\b",
     r"\b(one sentence|very short|briefly|no more than \d{1,2} words)\b"),
    (r"\b(no|without|avoid) (bullet|list)", r"\b(bullet points?|bulleted|numbered list)\b"),
    (r"\b(no|without) code\b", r"\b(include|write|provide|add) (the |some |a )?code\b"),
    (r"\bin english\b", r"\bin (french|german|spanish|chinese|japanese|russian|italian)\b"),
    (r"\b(formal|professional)\b", r"\b(casual|slang|informal)\b"),
    (r"\b(casual|informal|funny|humorous)\b", r"\b(formal|academic|solemn)\b"),
    (r"\b(for (kids|children)|to a child|five-year-old)\b", r"\b(technical jargon|for experts|graduate level)\b"),
]


def _script(text: str) -> str:
    """The dominant writing system: 'cjk', 'cyrillic', 'arabic', 'latin' (or '' when there are no letters)."""
    counts = {"cjk": 0, "cyrillic": 0, "arabic": 0, "latin": 0}
    for ch in text:
        code = ord(ch)
        if 0x4E00 <= code <= 0x9FFF or 0x3040 <= code <= 0x30FF or 0xAC00 <= code <= 0xD7AF:
            counts["cjk"] += 1
        elif 0x0400 <= code <= 0x04FF:
            counts["cyrillic"] += 1
        elif 0x0600 <= code <= 0x06FF:
            counts["arabic"] += 1
        elif ch.isascii() and ch.isalpha() or 0x00C0 <= code <= 0x024F:
            counts["latin"] += 1
    best = max(counts, key=counts.get)
    return best if counts[best] else ""


# langdetect loads its language profiles into a global factory on first use, and concurrent first calls (the
# complement workers are threads) can load them twice and skew every later verdict; calls are serialised.
_LANGDETECT_LOCK = threading.Lock()


def _language(text: str, min_probability: float) -> str | None:
    """The language code langdetect gives with at least min_probability, else None (unsure)."""
    import langdetect

    with _LANGDETECT_LOCK:
        langdetect.DetectorFactory.seed = 0  # langdetect samples internally; fixed for reproducible verdicts
        try:
            best = langdetect.detect_langs(text)[0]
        except langdetect.LangDetectException:
            return None
    return best.lang if best.prob >= min_probability else None


def switches_language(prompt: str, complement: str, rules: Rules = Rules()) -> bool:
    """A different writing system, or (Latin script) a different language by langdetect. A prompt too short to
    identify is taken to be in `rules.default_language`: language ID on a handful of words is unreliable
    ('Solve for x: 2x + 8 = 12.' comes out Danish), while complements are long enough to identify."""
    prompt_script, complement_script = _script(prompt), _script(complement)
    if prompt_script and complement_script and prompt_script != complement_script:
        return True
    if complement_script != "latin" or len(_WORD.findall(complement)) < rules.min_words_for_language_id:
        return False
    if len(_WORD.findall(prompt)) >= rules.min_words_for_language_id:
        prompt_language = _language(prompt, rules.min_language_probability)
    else:
        prompt_language = rules.default_language or None
    complement_language = _language(complement, rules.min_language_probability)
    return None not in (prompt_language, complement_language) and prompt_language != complement_language


def answers_prompt(prompt: str, complement: str, reference: str | None = None) -> bool:
    """An answer phrase, a code block, or the reference answer (a number not already in the prompt) stated."""
    if _ANSWER.search(complement) or "```" in complement:
        return True
    if reference:
        prompt_numbers = set(_NUMBER.findall(prompt))
        for number in _NUMBER.findall(str(reference)):
            if number not in prompt_numbers and re.search(rf"(?<![\d.]){re.escape(number)}(?![\d])", complement):
                return True
    return False


def conflicts_with_intent(prompt: str, complement: str) -> bool:
    for asked, contradicted in _CONFLICTS:
        if re.search(asked, prompt, re.IGNORECASE) and re.search(contradicted, complement, re.IGNORECASE):
            return True
    return False


def rule_failures(prompt: str, complement: str, reference: str | None = None, rules: Rules = Rules()
                  ) -> tuple[str, ...]:
    """The failure names (keys of FAILURES) the rules find; () when the complement passes them all."""
    failures = []
    if conflicts_with_intent(prompt, complement):
        failures.append("conflicts_with_intent")
    if len(_WORD.findall(complement)) > rules.max_words or (_script(complement) == "cjk" and len(complement) > 2 *
                                                            rules.max_words):
        failures.append("over_extends")
    if answers_prompt(prompt, complement, reference):
        failures.append("answers_prompt")
    if len(_DEMAND.findall(complement)) > rules.max_demands:
        failures.append("excessive_demands")
    if switches_language(prompt, complement, rules):
        failures.append("switches_language")
    return tuple(failures)


def parse_critic_reply(text: str) -> Verdict | None:
    """{"verdict": "accept"|"reject", "failures": [...]} anywhere in the reply -> Verdict; None if unreadable.

    Failure names outside FAILURES are kept (prefixed 'other:') so the report shows what the critic said.
    """
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        reply = json.loads(text[start:end + 1])
    except json.JSONDecodeError:
        return None
    verdict = str(reply.get("verdict", "")).strip().lower() if isinstance(reply, dict) else ""
    if verdict not in ("accept", "reject"):
        return None
    named = reply.get("failures") or []
    if not isinstance(named, list):
        named = [named]
    failures = tuple(str(f) if str(f) in FAILURES else f"other:{f}" for f in named)
    if verdict == "reject" and not failures:
        failures = ("other:unspecified",)
    return Verdict(verdict == "accept", () if verdict == "accept" else failures, "critic")


def critique(prompt: str, complement: str, ask: Ask | None = None, reference: str | None = None,
             rules: Rules = Rules(), attempts: int = 2) -> Verdict:
    """Rules first (free), then the critic endpoint when `ask` is given. A critic reply that cannot be read after
    `attempts` tries rejects the complement (source 'critic_unparseable'): unverified text is not training data."""
    failures = rule_failures(prompt, complement, reference, rules)
    if failures:
        return Verdict(False, failures, "rules")
    if ask is None:
        return Verdict(True)
    for _ in range(attempts):
        verdict = parse_critic_reply(ask(critic_messages(prompt, complement)))
        if verdict is not None:
            return verdict
    return Verdict(False, ("critic_unparseable",), "critic_unparseable")
