"""Recipe 7 (report 4.4): code. Category and difficulty labels, a rebalanced pool, responses checked for
conformance and run against their tests, and harder multi-turn follow-ups.

1. Labels: a pool record without `category` / `difficulty` is labelled by the teacher (one of CATEGORIES and
   DIFFICULTIES, else the record is dropped and counted by its last label failure).
2. Pool: knowledge Q&A kept at `knowledge_keep` (the report cuts it by 80%), "very_difficult" dropped, and no
   language above `max_language_share` of the pool.
3. Responses: the code must come in a fenced block tagged with the record's language (Python: it must parse) and,
   when the record has tests, pass them in the sandbox (tests are split into calls and expected values by
   `alignment.rewards.verdict`: the program cannot forge a pass). Knowledge answers need `min_answer_words` words.
4. Follow-up: for a `follow_up_share` of the records with tests, the teacher writes a harder related second turn
   with its own tests (they must split into calls and expected values, the function must be new, the request must
   name the first turn's function or share two content words with it, and the tests be at least as many as the
   first turn's), then answers it with the whole conversation; the answer must pass those tests.
"""
from __future__ import annotations

import ast
import collections
import os
import re

import numpy as np

from alignment.config import Field, positive
from alignment.rewards import sandbox, verdict
from alignment.synth import pools
from alignment.synth.driver import EndpointError, Result, Session, generate_verified, parse_json_reply, sft_record

NAME = "code"
FIELDS = {"num_items": positive(), "attempts": positive(), "knowledge_keep": Field(low=0, high=1),
          "max_language_share": Field(low=0, high=1, open_low=True), "follow_up_share": Field(low=0, high=1),
          "min_answer_words": positive(), "sandbox_seconds": Field(low=0, open_low=True)}
CATEGORIES = ("algorithm", "data_processing", "knowledge_qa", "debugging", "system_design")
DIFFICULTIES = ("easy", "medium", "hard", "very_difficult")
POOL_PATH = os.path.join(pools.DATA, "code_tasks.jsonl")
LABEL_SYSTEM = (
    "You label programming requests. Reply with JSON only: {\"category\": one of " + ", ".join(CATEGORIES) +
    ", \"difficulty\": one of " + ", ".join(DIFFICULTIES) + "}. 'very_difficult' is for requests no single answer "
    "can complete.")
ANSWER_SYSTEM = (
    "Answer the programming request. Put the code in one fenced block tagged with its language (for example "
    "```python), and explain it in a sentence or two. Answer questions about concepts in prose.")
FOLLOW_UP_SYSTEM = (
    "Given a programming conversation, write the user's next request: a harder task related to the first one that "
    "needs a new function. Reply with JSON only: {\"request\": the request, \"function\": the new function's name, "
    "\"tests\": [Python assert statements calling it]}.")
_COMMON = frozenset("write python function that returns return with from each when into list string".split())
_FENCE = re.compile(r"```([\w+#-]*)[ \t]*\n(.*?)```", re.DOTALL)


def label_failures(reply: str) -> tuple[list[str], dict]:
    labels = parse_json_reply(reply)
    if not isinstance(labels, dict):
        return ["label:unreadable"], {}
    failures = [f"label:bad_{key}" for key, allowed in (("category", CATEGORIES), ("difficulty", DIFFICULTIES))
                if labels.get(key) not in allowed]
    return failures, labels


def _label(item: dict, session: Session, options) -> dict:
    """The item with its labels (the pool's, else the teacher's), or with "label_failures"."""
    if item.get("category") in CATEGORIES and item.get("difficulty") in DIFFICULTIES:
        return item
    failures = []
    for attempt in range(options.attempts):
        try:
            reply = session.ask([{"role": "system", "content": LABEL_SYSTEM},
                                 {"role": "user", "content": item["prompt"]}], (item["id"], "label", attempt))
        except EndpointError:
            return {**item, "label_failures": ["label:endpoint_error"]}
        failures, labels = label_failures(reply)
        if not failures:
            return {**item, "category": labels["category"], "difficulty": labels["difficulty"]}
    return {**item, "label_failures": failures}


def rebalance(labelled: list[dict], options, seed: int) -> tuple[list[dict], dict]:
    """Knowledge Q&A downsampled, very difficult dropped, each language capped at its share of the pool."""
    rng, filtered = np.random.default_rng(seed), collections.Counter()
    qa = [i for i, r in enumerate(labelled) if r["category"] == "knowledge_qa"]
    drop = set(rng.permutation(qa)[:len(qa) - round(options.knowledge_keep * len(qa))].tolist())
    filtered["knowledge_qa_downsampled"] = len(drop)
    pool = [r for i, r in enumerate(labelled) if i not in drop]
    filtered["very_difficult"] = sum(r["difficulty"] == "very_difficult" for r in pool)
    pool = [r for r in pool if r["difficulty"] != "very_difficult"]
    cap = max(1, int(options.max_language_share * len(pool)))
    by_language = collections.defaultdict(list)
    for record in pool:
        by_language[record["language"]].append(record)
    kept = []
    for language, records in sorted(by_language.items()):
        chosen = sorted(rng.permutation(len(records))[:cap].tolist())
        filtered["language_balance"] += len(records) - len(chosen)
        kept += [records[i] for i in chosen]
    return kept, dict(filtered)


def items(options, seed: int, session: Session) -> tuple[list[dict], dict]:
    records = pools.read_records(options.pool or POOL_PATH, {"prompt": str, "language": str})[:options.num_items]
    for record in records:
        if "tests" in record:
            verdict.code_suite(record["tests"], record["where"])  # a test that cannot be judged is an input error
    records = [{**r, "id": str(r.get("id", r["where"])), "language": r["language"].lower()} for r in records]
    labelled = session.map(lambda r: _label(r, session, options), records)
    failed = collections.Counter(r["label_failures"][-1] for r in labelled if "label_failures" in r)
    pool, filtered = rebalance([r for r in labelled if "label_failures" not in r], options, seed)
    rng = np.random.default_rng([seed, 1])
    work = [{**r, "follow_up": bool("tests" in r and rng.random() < options.follow_up_share)} for r in pool]
    return work, {**filtered, **failed}


def code_block(response: str) -> tuple[str, str] | None:
    """(language tag, code) of the response's first fenced block."""
    match = _FENCE.search(response)
    return (match.group(1).lower(), match.group(2)) if match else None


def response_failures(response: str, item: dict, tests, options) -> list[str]:
    """Conformance (block, language, syntax; words for knowledge answers), then correctness on the tests."""
    block = code_block(response)
    if item["category"] == "knowledge_qa" and tests is None:
        words = len(re.sub(r"```.*?```", "", response, flags=re.DOTALL).split())
        return [] if words >= options.min_answer_words else ["code:answer_too_short"]
    if block is None:
        return ["code:no_code_block"]
    tag, code = block
    aliases = {"py": "python", "js": "javascript", "golang": "go"}
    if aliases.get(tag, tag) != item["language"]:
        return [f"code:wrong_language_tag:{tag or 'none'}"]
    if item["language"] == "python":
        try:
            ast.parse(code)
        except SyntaxError:
            return ["code:syntax_error"]
    if tests is None:
        return []
    limits = sandbox.Limits(cpu_seconds=options.sandbox_seconds, wall_seconds=2 * options.sandbox_seconds)
    outcome = verdict.judge(code, verdict.code_suite(tests, item["id"]), limits)
    return [] if outcome.status == "passed" else ["code:tests_failed"]


def follow_up_failures(reply: str, item: dict) -> tuple[list[str], dict]:
    request = parse_json_reply(reply)
    if not isinstance(request, dict) or not all(isinstance(request.get(k), str) and request[k].strip()
                                                for k in ("request", "function")):
        return ["follow_up:unreadable"], {}
    tests = request.get("tests")
    try:
        suite = verdict.code_suite(tests, f"{item['id']} follow-up")
    except ValueError:
        return ["follow_up:tests_cannot_be_judged"], {}
    failures = []
    first = re.findall(r"`(\w+)\(", item["prompt"])
    if first and request["function"] == first[0]:
        failures.append("follow_up:no_new_function")
    content = lambda text: set(re.findall(r"[a-z]{4,}", text.lower())) - _COMMON  # noqa: E731
    names_first = bool(first) and first[0] in request["request"]
    if not names_first and len(content(item["prompt"]) & content(request["request"])) < 2:
        failures.append("follow_up:unrelated")
    if len(suite.tests) < len(item.get("tests", ())):
        failures.append("follow_up:not_harder")
    return failures, request


def synthesize(item: dict, session: Session, options) -> Result:
    result = Result(item["id"], facts={"language": item["language"], "category": item["category"],
                                       "difficulty": item["difficulty"]})
    messages = [{"role": "system", "content": ANSWER_SYSTEM}, {"role": "user", "content": item["prompt"]}]
    verify = lambda reply: response_failures(reply, item, item.get("tests"), options)  # noqa: E731
    answer = generate_verified(session, result, messages, verify, options.attempts, (item["id"], "answer"))
    if answer is None:
        return result.drop("response_rejected")
    turns = messages[1:] + [{"role": "assistant", "content": answer}]
    if item["follow_up"]:
        turns = follow_up(item, turns, session, result, options) or turns
    result.facts["turns"] = len(turns) // 2
    result.records.append(sft_record(item["id"], NAME, "code", turns, language=item["language"],
                                     code_category=item["category"], difficulty=item["difficulty"]))
    return result


def follow_up(item: dict, turns: list[dict], session: Session, result: Result, options) -> list[dict] | None:
    """The conversation with a verified harder second turn, or None (counted) when none passes."""
    conversation = "\n\n".join(f"{m['role']}: {m['content']}" for m in turns)
    for attempt in range(options.attempts):
        reply = session.ask([{"role": "system", "content": FOLLOW_UP_SYSTEM},
                             {"role": "user", "content": conversation}], (item["id"], "follow_up", attempt))
        failures, request = follow_up_failures(reply, item)
        if not failures:
            break
        result.reject(failures)
    else:
        result.facts["follow_up"] = "request_rejected"
        return None
    messages = [{"role": "system", "content": ANSWER_SYSTEM}, *turns, {"role": "user", "content": request["request"]}]
    verify = lambda reply: response_failures(reply, item, request["tests"], options)  # noqa: E731
    answer = generate_verified(session, result, messages, verify, options.attempts, (item["id"], "answer_2"))
    if answer is None:
        result.facts["follow_up"] = "answer_rejected"
        return None
    result.facts["follow_up"] = "kept"
    return messages[1:] + [{"role": "assistant", "content": answer}]


def finish(results: list[Result], options, seed: int, workdir: str) -> dict:
    kept = [r for r in results if r.records]
    count = lambda key: dict(sorted(collections.Counter(r.facts[key] for r in kept).items()))  # noqa: E731
    return {"kept_by_language": count("language"), "kept_by_category": count("category"),
            "kept_by_difficulty": count("difficulty"),
            "follow_ups": dict(collections.Counter(r.facts["follow_up"] for r in results if "follow_up" in r.facts))}
