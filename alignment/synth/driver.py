"""The shared driver of the data-synthesis recipes: teacher and critic calls (cached, so a run resumes), checks,
rejection counting and JSONL output.

A recipe module (`alignment.synth.<recipe>`) holds its prompts, parsing and verifiers, its options' FIELDS, and
  items(options, seed, session) -> (work items [{"id", ...}], {filter reason: items left out})
  synthesize(item, session, options) -> Result          one item: teacher calls, each reply verified
  finish(results, options, seed, workdir) -> dict       optional: coverage and other figures, extra files
`run` calls `synthesize` for the items on worker threads (teacher requests overlap); checks that must run on the
calling thread (math-verify enforces its timeouts with signals) go through `session.on_main`. It writes:
  sft.jsonl       the kept records in chat form ({"messages", "category", "recipe", "id", ...}): SFT stage data
  attempts.jsonl  every response a verifier judged: {"id", "messages", "response", "failures"}
  pairs.jsonl     preference pairs for the RM and DPO stages: a verified response (chosen) and a failed attempt at
                  the same prompt (rejected), with the checkers it failed in "rejected_failures"
and returns the counts: items, kept, responses judged and rejected, dropped items by reason, failed checks by name
(a rejected try counts once per check it failed), items filtered out before synthesis by reason, teacher and critic
calls made and those replayed from the cache (calls.jsonl).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import logging
import os
import queue
import threading
from typing import Callable, Sequence

import ml_collections

from alignment.data.jsonl_cache import JsonlCache, input_hash
from alignment.pas.complement import Endpoint

logger = logging.getLogger(__name__)



def base_config(recipe: str) -> ml_collections.ConfigDict:
    """The fields every synth config has; the recipe's own options go in the block `config.<recipe>`."""
    c = ml_collections.ConfigDict()
    c.stage = "synth"  # which stage runs
    c.recipe = recipe  # which recipe runs (alignment.stages.synth.RECIPES)
    c.seed = 0  # item sampling and the teacher's request seeds
    c.teacher = ml_collections.ConfigDict(dict(
        url="embedded",  # OpenAI-compatible API root of the teacher LLM; 'embedded' starts the rule-based stand-in
        model="default",  # `model` sent to the teacher
        temperature=0.7,  # sampling temperature (each retry sends a new seed)
        max_tokens=1024,  # reply length limit
        timeout=120.0,  # seconds per request
        workers=8,  # items synthesised at once (their requests overlap)
        api_key_env="",  # name of the environment variable holding the API key ('' = none)
        flaw_rate=0.2,  # embedded teacher only: share of deliberately flawed replies (exercises the verifiers)
    ))
    c.critic = ml_collections.ConfigDict(dict(
        enabled=True,  # ask an LLM critic for what no program decides (reasonableness, style, tone)
        url="",  # critic API root; '' = the teacher's
        model="default",  # `model` sent to the critic
        max_tokens=256,  # room for the JSON verdict
        api_key_env="",  # environment variable with the critic's key when url is set
        attempts=2,  # asks until the verdict parses; then the item is rejected (critic_unparseable)
    ))
    c.pairs_per_prompt = 2  # preference pairs per prompt at most (one verified response vs distinct failed ones)
    return c


VERDICT_FORMAT = 'Reply with JSON only: {"verdict": "accept" or "reject", "failures": [short names of the problems]}.'


class EndpointError(RuntimeError):
    """The teacher or the critic did not answer: the item is dropped and counted, the run goes on."""


@dataclasses.dataclass
class Attempt:
    messages: list  # the conversation the response answers
    response: str
    failures: tuple  # the checks it failed; () = verified


@dataclasses.dataclass
class Result:
    id: str
    records: list = dataclasses.field(default_factory=list)  # kept records (chat form)
    attempts: list = dataclasses.field(default_factory=list)  # every judged response, for preference pairs
    rejected: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # failing checks
    dropped: str = ""  # why the item gave nothing; '' when it gave a record
    facts: dict = dataclasses.field(default_factory=dict)  # recipe figures for its report

    def reject(self, failures: Sequence[str]) -> None:
        self.rejected.update(failures)

    def drop(self, reason: str) -> "Result":
        self.dropped = reason
        return self


class MainThread:
    """Runs functions on the thread that serves it, for checks that must not run on a worker thread."""

    def __init__(self):
        self._owner = threading.get_ident()
        self._queue: queue.Queue = queue.Queue()

    def call(self, fn: Callable, *args):
        if threading.get_ident() == self._owner:
            return fn(*args)
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((future, fn, args))
        return future.result()

    def serve_until_done(self, futures: Sequence[concurrent.futures.Future]) -> None:
        while not all(f.done() for f in futures):
            try:
                future, fn, args = self._queue.get(timeout=0.02)
            except queue.Empty:
                continue
            try:
                future.set_result(fn(*args))
            except Exception as e:  # handed to the worker that asked, which counts it
                future.set_exception(e)


def parse_json_reply(text: str, max_starts: int = 64):
    """The first JSON object or array in a reply (models wrap JSON in prose or code fences); None if none parses
    from the first `max_starts` brackets (a hostile reply full of brackets costs at most that many tries)."""
    decoder = json.JSONDecoder()
    starts = (index for index, char in enumerate(text) if char in "{[")
    for index, _ in zip(starts, range(max_starts)):
        try:
            return decoder.raw_decode(text, index)[0]
        except json.JSONDecodeError:
            continue
    return None


def parse_verdict(text: str) -> tuple[str, ...] | None:
    """{"verdict": "accept"|"reject", "failures": [...]} -> () accepted, (failure names) rejected; None if
    unreadable."""
    reply = parse_json_reply(text)
    verdict = str(reply.get("verdict", "")).strip().lower() if isinstance(reply, dict) else ""
    if verdict not in ("accept", "reject"):
        return None
    if verdict == "accept":
        return ()
    named = reply.get("failures") or ["unspecified"]
    named = named if isinstance(named, list) else [named]
    return tuple(f"critic:{str(name).strip()[:60] or 'unspecified'}" for name in named)


class Session:
    """The teacher and critic endpoints of a run, their call cache, and the thread that runs main-thread checks."""

    def __init__(self, teacher: Endpoint, critic: Endpoint | None, cache_path: str, endpoint_id: str, seed: int = 0,
                 critic_attempts: int = 2, workers: int = 8):
        self.teacher, self.critic, self.seed, self.workers = teacher, critic, seed, workers
        self.endpoint_id = endpoint_id  # names the endpoint in cache keys (the embedded one's port changes)
        self.critic_attempts = critic_attempts
        self.cache = JsonlCache(cache_path)
        self.main = MainThread()
        self.calls = collections.Counter()
        self._lock = threading.Lock()

    def _call(self, endpoint: Endpoint, role: str, messages: list[dict], salt) -> str:
        seed = int(input_hash(self.seed, salt), 16) % 2**31
        key = input_hash(role, self.endpoint_id, endpoint.model, endpoint.temperature, endpoint.max_tokens, messages,
                         seed)
        with self._lock:
            cached = self.cache.get(key)
        if cached is not None:
            with self._lock:
                self.calls["cached"] += 1
            return cached["reply"]
        try:
            reply = endpoint.ask(messages, seed=seed)
        except RuntimeError as e:
            raise EndpointError(str(e)) from None
        if not isinstance(reply, str):
            raise EndpointError(f"{role} endpoint answered {type(reply).__name__} content, not text")
        with self._lock:
            self.calls[role] += 1
            self.cache.put(key, {"reply": reply})
        return reply

    def ask(self, messages: list[dict], salt) -> str:
        """The teacher's reply; `salt` (item id, step, try) fixes the request's sampling seed."""
        return self._call(self.teacher, "teacher", messages, salt)

    def judge(self, messages: list[dict], salt) -> tuple[tuple[str, ...], dict]:
        """(the critic's failures, its whole JSON reply) for a request in VERDICT_FORMAT; (), {} = accepted, and no
        critic accepts everything. A reply that cannot be read after `critic_attempts` tries rejects: unverified
        text is not training data."""
        if self.critic is None:
            return (), {}
        for attempt in range(self.critic_attempts):
            reply = self._call(self.critic, "critic", messages, (salt, attempt))
            failures = parse_verdict(reply)
            if failures is not None:
                return failures, parse_json_reply(reply)
        return ("critic_unparseable",), {}

    def verdict(self, messages: list[dict], salt) -> tuple[str, ...]:
        return self.judge(messages, salt)[0]

    def on_main(self, fn: Callable, *args):
        return self.main.call(fn, *args)

    def map(self, fn: Callable, inputs: Sequence) -> list:
        """[fn(x) for x in inputs] on `workers` threads, this thread serving their main-thread checks."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.workers) as pool:
            futures = [pool.submit(fn, x) for x in inputs]
            self.main.serve_until_done(futures)
        return [f.result() for f in futures]


def generate_verified(session: Session, result: Result, messages: list[dict], verify: Callable[[str], Sequence[str]],
                      attempts: int, salt, shown: list[dict] | None = None,
                      clean: Callable[[str], str] = lambda reply: reply) -> str | None:
    """Ask the teacher up to `attempts` times until a reply passes `verify` (reply -> failing check names). Every
    try is recorded in `result` (its attempts, for preference pairs, and its rejection counts) as training data
    shows it: the prompt `shown` (default: `messages` without the teacher's system message) and `clean(reply)`
    (e.g. with mentions of a reference removed). Returns the cleaned verified reply, or None."""
    if shown is None:
        shown = messages[1:] if messages and messages[0]["role"] == "system" else messages
    for attempt in range(attempts):
        reply = session.ask(messages, (salt, attempt)).strip()
        failures, cleaned = tuple(verify(reply)), clean(reply)
        result.attempts.append(Attempt(shown, cleaned, failures))
        if not failures:
            return cleaned
        result.reject(failures)
    return None


def sft_record(item_id: str, recipe: str, category: str, messages: list[dict], **fields) -> dict:
    return {"id": item_id, "recipe": recipe, "category": category, "messages": messages, **fields}


def _synthesize(recipe, item: dict, session: Session, options) -> Result:
    try:
        return recipe.synthesize(item, session, options)
    except EndpointError as e:
        logger.warning("item %s: %s", item["id"], e)
        return Result(item["id"], facts={"error": str(e)}).drop("endpoint_error")


def preference_pairs(results: Sequence[Result], recipe: str, per_prompt: int) -> list[dict]:
    """Up to `per_prompt` pairs per prompt: its first verified response against distinct failed attempts."""
    pairs = []
    for result in results:
        by_prompt: dict[str, list[Attempt]] = {}
        for attempt in result.attempts:
            by_prompt.setdefault(json.dumps(attempt.messages, sort_keys=True), []).append(attempt)
        for attempts in by_prompt.values():
            chosen = next((a for a in attempts if not a.failures), None)
            if chosen is None:
                continue
            failed = {a.response: a for a in attempts if a.failures and a.response != chosen.response}
            for attempt in list(failed.values())[:per_prompt]:
                pairs.append({"id": result.id, "recipe": recipe, "messages": chosen.messages,
                              "chosen": chosen.response, "rejected": attempt.response,
                              "rejected_failures": list(attempt.failures)})
    return pairs


def write_jsonl(path: str, records: Sequence[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def run(recipe, name: str, options, session: Session, workdir: str, *, seed: int, pairs_per_prompt: int) -> dict:
    """Synthesise recipe `name` into `workdir` (sft.jsonl, attempts.jsonl, pairs.jsonl); returns the counts."""
    items, filtered = recipe.items(options, seed, session)
    results = session.map(lambda item: _synthesize(recipe, item, session, options), items)
    records = [r for result in results for r in result.records]
    pairs = preference_pairs(results, name, pairs_per_prompt)
    write_jsonl(os.path.join(workdir, "sft.jsonl"), records)
    write_jsonl(os.path.join(workdir, "pairs.jsonl"), pairs)
    write_jsonl(os.path.join(workdir, "attempts.jsonl"),
                [{"id": r.id, "messages": a.messages, "response": a.response, "failures": list(a.failures)}
                 for r in results for a in r.attempts])
    rejected = sum((r.rejected for r in results), collections.Counter())
    dropped = collections.Counter(r.dropped for r in results if r.dropped)
    errors = [r.facts["error"] for r in results if "error" in r.facts]
    report = {
        "recipe": name,
        "items": len(items),
        "kept_items": sum(not r.dropped for r in results),
        "responses_judged": sum(len(r.attempts) for r in results),
        "responses_rejected": sum(bool(a.failures) for r in results for a in r.attempts),
        "records": len(records),
        "pairs": len(pairs),
        "dropped": dict(dropped.most_common()),
        "rejected": dict(rejected.most_common()),
        "filtered": dict(filtered),
        "teacher_calls": session.calls["teacher"],
        "critic_calls": session.calls["critic"],
        "cached_calls": session.calls["cached"],
    }
    if errors:
        report["first_endpoint_error"] = errors[0]
        logger.warning("%s: %d items lost to endpoint errors (first: %s)", name, len(errors), errors[0])
    if hasattr(recipe, "finish"):
        report.update(recipe.finish(results, options, seed, workdir))
    logger.info("synth %s: %d items -> %d records, %d pairs; dropped %s", name, len(items), len(records), len(pairs),
                report["dropped"])
    return report
