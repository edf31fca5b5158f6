"""Final-answer checks: GSM8K exact match on the final number, MATH-style symbolic equivalence.

Both double as verifiable rewards (1.0 correct, 0.0 otherwise).
"""
from __future__ import annotations

import decimal
import re

# A number as models write it: optional sign and currency, thousands separators, optional decimals.
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
# Where a response states its answer, most explicit first; the number right after the last one wins.
_MARKERS = (re.compile(r"####"), re.compile(r"answer is", re.IGNORECASE), re.compile(r"\\boxed\{"))


def _canonical(number: str) -> str | None:
    text = number.replace("$", "").replace(",", "")
    try:
        value = decimal.Decimal(text)
    except decimal.InvalidOperation:
        return None
    value = value.normalize()
    return format(value, "f") if value != 0 else "0"


def final_number(response: str) -> str | None:
    """The response's final numeric answer in canonical form ('18', '-2.5'), or None.

    The first number after the last '####', 'answer is' or '\\boxed{' when present (models often keep
    writing after stating the answer), else the last number in the text.
    """
    for marker in _MARKERS:
        hits = list(marker.finditer(response))
        if hits:
            found = _NUMBER.search(response, hits[-1].end())
            if found:
                return _canonical(found.group())
    numbers = _NUMBER.findall(response)
    return _canonical(numbers[-1]) if numbers else None


def gsm8k_reference(answer: str) -> str:
    """The reference number of a GSM8K `answer` field: what follows '####'."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '####' line: {answer[-80:]!r}")
    value = _canonical(answer.rsplit("####", 1)[1].strip())
    if value is None:
        raise ValueError(f"GSM8K reference is not a number: {answer.rsplit('####', 1)[1].strip()!r}")
    return value


def gsm8k_correct(response: str, reference: str) -> bool:
    """Exact match of the response's final number against the reference number (numerically: 18.0 == 18)."""
    predicted, expected = final_number(response), _canonical(reference)
    return predicted is not None and predicted == expected


def math_equivalent(response: str, reference: str) -> bool:
    """Whether the response's final answer equals `reference` symbolically (math-verify: sympy-backed,
    handles \\boxed{}, fractions, radicals, intervals, percentages). Call from the main thread: math-verify
    enforces its timeouts with signals."""
    from math_verify import parse, verify

    gold_text = reference if ("$" in reference or "\\boxed" in reference) else f"${reference}$"
    gold = parse(gold_text)
    if not gold:
        raise ValueError(f"reference answer could not be parsed: {reference!r}")
    return bool(verify(gold, parse(response)))
