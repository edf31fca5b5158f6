"""Checklist judging by an LLM behind any OpenAI-compatible endpoint.

The judge sees the instruction (the whole conversation for multi-turn samples), an optional reference
answer, the response and a numbered checklist, and answers one `<number>: <0|1>` line per item. The prompt
and the raw answer are cached (see cache.py), so a finished run re-scores from the cache without a single
judge call, and a changed prompt or judge model is judged afresh.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import re
from typing import Callable

from alignment.data.jsonl_cache import JsonlCache, input_hash

JUDGE_TEMPLATE = """You are grading a model's response against a checklist.

[Instruction]
{instruction}

[Reference answer]
{reference}

[Response]
{response}

[Checklist]
{checklist}

For each checklist item decide whether the response fully satisfies it (1) or not (0). Judge every item on \
its own. When there is no reference answer, judge from the instruction alone. Reply with exactly {count} \
lines, one per item in order, each of the form `<item number>: <0 or 1>`, and nothing else."""

_LINE = re.compile(r"^\s*\[?(\d+)\]?\s*[:.)\t-]\s*\**([01])\**\s*$")


@dataclasses.dataclass(frozen=True)
class Judgement:
    scores: list[int]  # one 0/1 per criterion; all 0 when the judge never gave a parseable answer
    parsed: bool  # False: every attempt was unparseable, the scores are a 0 fallback and are counted
    prompt: str
    raw: str  # the judge's last answer, verbatim


def render_conversation(messages: list[dict]) -> str:
    """A conversation as the judge reads it; a single user turn is shown as its bare text."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"<{m['role']}>\n{m['content']}" for m in messages)


def judge_prompt(messages: list[dict], response: str, criteria: list[str], reference: str = "") -> str:
    if not criteria:
        raise ValueError("a checklist needs at least one criterion")
    checklist = "\n".join(f"{i}. {c}" for i, c in enumerate(criteria, start=1))
    return JUDGE_TEMPLATE.format(instruction=render_conversation(messages), reference=reference or "(none)",
                                 response=response, checklist=checklist, count=len(criteria))


def parse_judgement(text: str, count: int) -> list[int] | None:
    """The 0/1 scores of items 1..count, or None unless each item is answered once and consistently."""
    found: dict[int, int] = {}
    for line in text.splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        item, score = int(match.group(1)), int(match.group(2))
        if found.get(item, score) != score:
            return None
        found[item] = score
    if set(found) != set(range(1, count + 1)):
        return None
    return [found[i] for i in range(1, count + 1)]


def judge_checklists(items: list[dict], ask: Callable[[str], str], cache: JsonlCache, *, judge_id: str,
                     attempts: int = 3, workers: int = 8) -> list[Judgement]:
    """Judge each item {"id", "messages", "response", "criteria", "reference"?}.

    `ask(prompt) -> text` calls the judge; `judge_id` (endpoint and model) is part of the cache key. An
    unparseable answer is asked again up to `attempts` times, then scored all 0 with parsed=False.
    """
    prompts = [judge_prompt(i["messages"], i["response"], i["criteria"], i.get("reference", "")) for i in items]
    keys = [f"{item['id']}:{input_hash(judge_id, prompt)}" for item, prompt in zip(items, prompts)]

    def judge_one(index: int) -> dict:
        raw = ""
        for _ in range(attempts):
            raw = ask(prompts[index])
            if parse_judgement(raw, len(items[index]["criteria"])) is not None:
                break
        return {"prompt": prompts[index], "raw": raw}

    todo = [i for i, key in enumerate(keys) if cache.get(key) is None]
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        for index, record in zip(todo, pool.map(judge_one, todo)):
            cache.put(keys[index], record)

    judgements = []
    for item, key in zip(items, keys):
        record = cache.get(key)
        scores = parse_judgement(record["raw"], len(item["criteria"]))
        judgements.append(Judgement(scores or [0] * len(item["criteria"]), scores is not None,
                                    record["prompt"], record["raw"]))
    return judgements
