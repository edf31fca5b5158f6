"""Complement generation for PAS training data: few-shot teacher -> critique -> regenerate the rejected.

For each prompt the teacher sees golden (prompt, complement) examples of the prompt's category and writes a
complement; the critique (rules, then the critic endpoint) accepts or rejects it; a rejected complement is
regenerated with a new seed, up to `attempts` times. Prompts that never pass are left out and counted, with
every rejection's reasons in the report.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import zlib

import numpy as np

from alignment.generation.client import chat
from alignment.pas.critique import Rules, critique
from alignment.pas.template import teacher_messages

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible chat endpoint: `ask(messages, **params) -> reply text`."""

    url: str
    model: str = "default"
    temperature: float = 0.7
    max_tokens: int = 128
    timeout: float = 120.0
    api_key: str = ""

    def ask(self, messages: list[dict], seed: int | None = None) -> str:
        params = dict(model=self.model, temperature=self.temperature, max_tokens=self.max_tokens,
                      timeout=self.timeout, api_key=self.api_key)
        if seed is not None:
            params["seed"] = seed
        return chat(self.url, messages, **params)


def few_shot_examples(seeds: dict[str, list[dict]], category: str, num: int, rng: np.random.Generator
                      ) -> list[dict]:
    """`num` golden examples of the category (of all categories when it has none), in a random order."""
    pool = seeds.get(category) or [e for examples in seeds.values() for e in examples]
    order = rng.permutation(len(pool))[:num]
    return [pool[i] for i in order]


def complement_one(record: dict, seeds: dict[str, list[dict]], teacher: Endpoint, critic: Endpoint | None,
                   num_shots: int, attempts: int, rules: Rules, seed: int) -> dict:
    """{'complement' or None, 'attempts', 'rejections': [failure names per rejected try], 'error'?}."""
    rng = np.random.default_rng([seed, zlib.crc32(record["prompt_id"].encode())])
    keywords = record.get("keywords", [])
    rejections = []
    for attempt in range(attempts):
        examples = few_shot_examples(seeds, record["category"], num_shots, rng)
        messages = teacher_messages(record["prompt"], record["category"], examples, keywords)
        try:
            text = teacher.ask(messages, seed=int(rng.integers(2**31))).strip()
            ask = None if critic is None else (lambda m: critic.ask(m))
            verdict = critique(record["prompt"], text, ask, record.get("answer"), rules)
        except RuntimeError as e:  # the endpoint failed: counted, never a crash of the whole run
            return {"complement": None, "attempts": attempt + 1, "rejections": rejections, "error": str(e)}
        if verdict.accepted:
            return {"complement": text, "attempts": attempt + 1, "rejections": rejections}
        rejections.append(list(verdict.failures))
    return {"complement": None, "attempts": attempts, "rejections": rejections}


def generate_complements(records: list[dict], seeds: dict[str, list[dict]], teacher: Endpoint,
                         critic: Endpoint | None = None, *, num_shots: int = 2, attempts: int = 3,
                         rules: Rules = Rules(), workers: int = 8, seed: int = 0) -> tuple[list[dict], dict]:
    """(records with an accepted `complement`, report). Requests run `workers` at a time.

    The report counts prompts, accepted (and on which try), dropped after `attempts` rejections, endpoint errors,
    and rejections by failure name.
    """
    run = lambda r: complement_one(r, seeds, teacher, critic, num_shots, attempts, rules, seed)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(run, records))
    kept, reasons, tries, errors = [], collections.Counter(), collections.Counter(), []
    for record, result in zip(records, results):
        for failures in result["rejections"]:
            reasons.update(failures)
        if result.get("error"):
            errors.append(f"{record['prompt_id']}: {result['error']}")
        elif result["complement"] is not None:
            kept.append({**record, "complement": result["complement"]})
            tries[result["attempts"]] += 1
    report = {
        "prompts": len(records),
        "accepted": len(kept),
        "accepted_on_try": {str(k): v for k, v in sorted(tries.items())},
        "dropped_after_rejections": len(records) - len(kept) - len(errors),
        "endpoint_errors": len(errors),
        "rejections": dict(reasons.most_common()),
        "rejected_tries": sum(len(r["rejections"]) for r in results),
    }
    if errors:
        logger.warning("complement generation: %d endpoint errors (first: %s)", len(errors), errors[0])
    logger.info("complements: %s", report)
    return kept, report
