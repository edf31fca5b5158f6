"""Prompt quality: pairwise judgements against per-bucket anchors, a Bradley-Terry score, a learned scorer.

1. Anchors. Every bucket (a prompt category) has a few anchor prompts with reference scores (`load_anchors`).
2. Judgements. Each candidate is compared with every anchor of its bucket by a judge endpoint, which must answer
   strict JSON {"clarity": "A"|"B"|"tie", "practicality": ..., "complexity": ..., "novelty": ...}. Each pair is
   asked in both orders (candidate as A, then as B) so a judge's position bias cancels. An unparseable answer
   or a failed call is asked again, at most `attempts` calls in all; then it is counted in `JudgeStats` (with
   the first few reasons) and left out of the fit. Parsed answers are cached on disk keyed by judge id and
   request, so a re-run makes no calls for them (failures are not cached: a re-run asks again).
3. Scores: Bradley-Terry with the anchors pinned at their reference scores. On one dimension a candidate of
   strength s beats an anchor of score a with probability sigmoid(s - a); a tie is half a win and half a loss.
   With w_k wins in n_k judgements against anchor k (score a_k), s maximises

       sum_k (w_k + c/2) log sigmoid(s - a_k) + (n_k - w_k + c/2) log sigmoid(a_k - s)

   where c = `prior_ties` pseudo-judgements per anchor, scored as ties, keep a candidate that wins (or loses)
   everything at a finite score. The maximiser solves sum_k (n_k + c) sigmoid(s - a_k) = sum_k (w_k + c/2),
   found by bisection (the left side increases with s). One anchor gives s = a + logit((w + c/2) / (n + c)).
   Anchor scores are thus on the logit scale: a prompt 1 above an anchor wins 73% of the time against it.
   A prompt's score is the mean of its four dimension scores; NaN when it has no parseable judgement.
4. Scorer. Scores -> preference pairs within each bucket (the better prompt is the chosen "response" to the fixed
   SCORER_INSTRUCTION) -> the rm stage's config for them (`scorer_config`; the PAS stage runs it) ->
   `load_scorer` scores prompts without a judge;
   `keep_above` keeps prompts scoring above a threshold.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
from typing import Callable, Sequence

import ml_collections
import numpy as np

from alignment.data.jsonl_cache import JsonlCache, input_hash
from alignment.data.sources import read_jsonl
from alignment.generation.client import chat
from alignment.pas.data import prompt_text, write_jsonl
from alignment.rewards.reward_model import load_reward_model

logger = logging.getLogger(__name__)

ANCHORS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "anchors.jsonl")  # shipped, 5 categories
DIMENSIONS = ("clarity", "practicality", "complexity", "novelty")
_VERDICTS = {"a": "A", "b": "B", "tie": "tie"}

JUDGE_TEMPLATE = """Compare two user prompts, as a data curator choosing prompts to train an assistant on.

[Prompt A]
{first}
[End of prompt A]

[Prompt B]
{second}
[End of prompt B]

For each dimension say which prompt is better, or "tie":
- clarity: the request is unambiguous and easy to understand
- practicality: a real user would need it and it can be answered
- complexity: it demands more reasoning, knowledge or concrete constraints
- novelty: it is less common and more original

Reply with one JSON object and nothing else, exactly of the form
{{"clarity": "A"|"B"|"tie", "practicality": "A"|"B"|"tie", "complexity": "A"|"B"|"tie", "novelty": "A"|"B"|"tie"}}"""

# The rm stage scores responses to a prompt; the scorer reads each candidate prompt as the response to this.
# Short, because it precedes every candidate inside the rm stage's data.max_length tokens.
SCORER_INSTRUCTION = "Write a good prompt."


@dataclasses.dataclass(frozen=True)
class Anchor:
    prompt: str
    score: float  # reference score on the Bradley-Terry logit scale


def load_anchors(path: str) -> dict[str, list[Anchor]]:
    """{bucket: anchors} from JSONL lines {"bucket": str, "prompt": str, "score": number}."""
    anchors: dict[str, list[Anchor]] = {}
    for number, record in read_jsonl(path):
        bucket, prompt, score = record.get("bucket"), record.get("prompt"), record.get("score")
        if not isinstance(bucket, str) or not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path}:{number}: an anchor needs string fields 'bucket' and 'prompt'")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not np.isfinite(score):
            raise ValueError(f"{path}:{number}: anchor 'score' must be a finite number, got {score!r}")
        anchors.setdefault(bucket, []).append(Anchor(prompt, float(score)))
    if not anchors:
        raise ValueError(f"{path}: no anchors")
    return anchors


# --- judging ---------------------------------------------------------------------------------------------------

def judge_request(first: str, second: str) -> str:
    return JUDGE_TEMPLATE.format(first=first, second=second)


def parse_verdict(text: str) -> dict[str, str] | None:
    """{dimension: 'A' | 'B' | 'tie'} from the judge's answer (a JSON object, code fences tolerated), or None
    unless every dimension has one of those answers."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        return None
    try:
        answer = json.loads(text[start:end + 1])
    except json.JSONDecodeError:
        return None
    if not isinstance(answer, dict):
        return None
    verdict = {}
    for dim in DIMENSIONS:
        value = answer.get(dim)
        if not isinstance(value, str) or value.strip().lower() not in _VERDICTS:
            return None
        verdict[dim] = _VERDICTS[value.strip().lower()]
    return verdict


def endpoint_ask(base_url: str, *, model: str = "default", **params) -> Callable[[str], str]:
    """ask(request) -> answer: one greedy chat completion from an OpenAI-compatible endpoint (one request: the
    judge's own `attempts` cover failures)."""
    return lambda request: chat(base_url, [{"role": "user", "content": request}], model=model, retries=0,
                                **{"temperature": 0.0, **params})


@dataclasses.dataclass
class JudgeStats:
    """What happened to every comparison, so none is lost silently."""

    comparisons: int = 0
    cached: int = 0  # answered from the cache, no call
    calls: int = 0  # endpoint calls made, retries included
    retried: int = 0  # comparisons that needed more than one call
    unparseable: int = 0  # no parseable answer after `attempts` calls (the last one answered)
    failed: int = 0  # the endpoint raised on the last of `attempts` calls
    unscored_prompts: int = 0  # prompts left without a single parseable judgement (score NaN)
    examples: list = dataclasses.field(default_factory=list)  # the first few reasons of each kind of loss

    def lost(self, index: int, failure: str) -> None:
        kind = failure.split(":", 1)[0]
        if sum(e.startswith(kind) for e in self.examples) < 3:
            self.examples.append(f"{failure} (comparison {index})")


def _ask_until_parsed(ask: Callable[[str], str], request: str, attempts: int) -> tuple[dict | None, str, int, str]:
    """(verdict or None, last raw answer, calls made, last failure: '' | 'failed: ...' | 'unparseable: ...')."""
    raw, failure = "", ""
    for call in range(1, attempts + 1):
        try:
            raw = ask(request)
        except RuntimeError as e:  # the endpoint failed (the client wraps HTTP, connection and timeout errors)
            failure = f"failed: {e}"
            continue
        verdict = parse_verdict(raw)
        if verdict is not None:
            return verdict, raw, call, ""
        failure = f"unparseable: {raw[:200]!r}"
    return None, raw, attempts, failure


def judge_all(requests: Sequence[str], ask: Callable[[str], str], cache: JsonlCache, *, judge_id: str,
              attempts: int = 3, workers: int = 8) -> tuple[list[dict | None], JudgeStats]:
    """One verdict (or None, counted in the stats) per request; `judge_id` (endpoint + model) keys the cache."""
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    stats = JudgeStats(comparisons=len(requests))
    keys = [input_hash(judge_id, request) for request in requests]
    verdicts: list[dict | None] = [None] * len(requests)
    todo = []
    for index, key in enumerate(keys):
        hit = cache.get(key)
        if hit is None:
            todo.append(index)
        else:
            verdicts[index] = hit["verdict"]
            stats.cached += 1
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        answers = pool.map(lambda i: _ask_until_parsed(ask, requests[i], attempts), todo)
        for index, (verdict, raw, calls, failure) in zip(todo, answers):  # cache writes stay on this thread
            stats.calls += calls
            stats.retried += calls > 1
            if verdict is None:
                stats.failed += failure.startswith("failed")
                stats.unparseable += failure.startswith("unparseable")
                stats.lost(index, failure)
                continue
            verdicts[index] = verdict
            cache.put(keys[index], {"verdict": verdict, "raw": raw})
    return verdicts, stats


# --- scores ----------------------------------------------------------------------------------------------------

def bradley_terry(wins: np.ndarray, games: np.ndarray, anchor_scores: np.ndarray, prior_ties: float = 0.5,
                  iterations: int = 100) -> np.ndarray:
    """Scores [n] float64 of n prompts judged against the same k anchors (formula in the module docstring).

    wins, games [n, k]: judgements won (ties count 0.5) and made against each anchor; anchor_scores [k].
    NaN for a prompt without any judgement.
    """
    if prior_ties <= 0:
        raise ValueError(f"prior_ties must be positive (it keeps all-win prompts finite), got {prior_ties}")
    wins, games = np.asarray(wins, np.float64), np.asarray(games, np.float64)
    anchors = np.asarray(anchor_scores, np.float64)[None, :]  # [1, k]
    target = (wins + prior_ties / 2).sum(1, keepdims=True)  # [n, 1]
    weight = games + prior_ties  # [n, k]
    rate = target / weight.sum(1, keepdims=True)
    # At s = min(a) + logit(rate) every sigmoid(s - a_k) <= rate, so sum_k weight_k sigmoid(s - a_k) <= target;
    # at max(a) + logit(rate) it is >= target: the root lies in between.
    lo = anchors.min() + np.log(rate / (1 - rate))
    hi = anchors.max() + np.log(rate / (1 - rate))
    for _ in range(iterations):
        mid = (lo + hi) / 2
        above = (weight / (1 + np.exp(anchors - mid))).sum(1, keepdims=True) > target
        lo, hi = np.where(above, lo, mid), np.where(above, mid, hi)
    return np.where(games.sum(1) > 0, ((lo + hi) / 2)[:, 0], np.nan)


@dataclasses.dataclass
class QualityScores:
    scores: np.ndarray  # [n] float64: mean over dimensions; NaN = no parseable judgement
    per_dimension: dict[str, np.ndarray]  # {dimension: [n] float64}
    stats: JudgeStats


def record_buckets(records: Sequence[dict], bucket_field: str, known: Sequence[str]) -> list[str]:
    """Each record's bucket; a missing field or a bucket without anchors raises naming the record index."""
    buckets = []
    for index, record in enumerate(records):
        bucket = record.get(bucket_field)
        if not isinstance(bucket, str):
            raise ValueError(f"record {index}: missing string field {bucket_field!r}")
        if bucket not in known:
            raise ValueError(f"record {index}: field {bucket_field!r}={bucket!r} has no anchors "
                             f"(buckets with anchors: {sorted(known)})")
        buckets.append(bucket)
    return buckets


def score_prompts(records: Sequence[dict], anchors: dict[str, list[Anchor]], ask: Callable[[str], str],
                  cache_path: str, *, judge_id: str, bucket_field: str = "category", attempts: int = 3,
                  workers: int = 8, prior_ties: float = 0.5) -> QualityScores:
    """Judge every record's prompt against its bucket's anchors (both orders) and fit its scores."""
    texts = [prompt_text(record, f"record {index}") for index, record in enumerate(records)]
    buckets = record_buckets(records, bucket_field, [bucket for bucket, listed in anchors.items() if listed])
    # (prompt index, anchor index, candidate shown first)
    plan = [(i, k, first) for i, bucket in enumerate(buckets) for k in range(len(anchors[bucket]))
            for first in (True, False)]
    requests = [judge_request(texts[i], anchors[buckets[i]][k].prompt) if first
                else judge_request(anchors[buckets[i]][k].prompt, texts[i]) for i, k, first in plan]
    verdicts, stats = judge_all(requests, ask, JsonlCache(cache_path), judge_id=judge_id, attempts=attempts,
                                workers=workers)

    width = max(len(a) for a in anchors.values())  # anchors beyond a bucket's own count get no games
    wins = np.zeros((len(texts), width, len(DIMENSIONS)))
    games = np.zeros((len(texts), width))
    for (i, k, first), verdict in zip(plan, verdicts):
        if verdict is None:
            continue
        games[i, k] += 1
        for d, dim in enumerate(DIMENSIONS):
            wins[i, k, d] += 0.5 if verdict[dim] == "tie" else float(verdict[dim] == ("A" if first else "B"))

    per_dimension = {dim: np.full(len(texts), np.nan) for dim in DIMENSIONS}
    for bucket, bucket_anchors in anchors.items():
        rows = np.asarray([i for i, b in enumerate(buckets) if b == bucket], np.int64)
        if not len(rows):
            continue
        k = len(bucket_anchors)
        reference = np.asarray([a.score for a in bucket_anchors])
        for d, dim in enumerate(DIMENSIONS):
            per_dimension[dim][rows] = bradley_terry(wins[rows, :k, d], games[rows, :k], reference, prior_ties)
    scores = np.mean([per_dimension[dim] for dim in DIMENSIONS], axis=0)
    stats.unscored_prompts = int(np.isnan(scores).sum())
    logger.info("prompt quality: %s", dataclasses.asdict(stats))
    return QualityScores(scores, per_dimension, stats)


def keep_above(records: Sequence[dict], scores: np.ndarray, threshold: float) -> tuple[list[dict], dict]:
    """(records scoring above threshold, {kept, below, unscored}); NaN scores are unscored and not kept."""
    scores = np.asarray(scores, np.float64)
    if len(scores) != len(records):
        raise ValueError(f"{len(scores)} scores for {len(records)} records")
    kept = [record for record, score in zip(records, scores) if score > threshold]
    counts = {"kept": len(kept), "below": int((scores <= threshold).sum()), "unscored": int(np.isnan(scores).sum())}
    logger.info("prompt quality above %g: %s", threshold, counts)
    return kept, counts


# --- the learned scorer ----------------------------------------------------------------------------------------

def preference_pairs(texts: Sequence[str], scores: np.ndarray, buckets: Sequence[str], *, min_gap: float = 0.5,
                     pairs_per_prompt: int = 4, seed: int = 0) -> list[dict]:
    """rm-stage pair records {prompt: SCORER_INSTRUCTION, chosen, rejected, margin, category}.

    Within each bucket, each scored prompt is paired with up to `pairs_per_prompt` random others whose score
    differs by at least `min_gap` (near-equal scores are judge noise, not preferences); the better is chosen and
    `margin` is the score gap. Anchors can be passed as texts too, with their reference scores.
    """
    scores = np.asarray(scores, np.float64)
    rng = np.random.default_rng(seed)
    chosen_rejected: set[tuple[int, int]] = set()
    for bucket in sorted(set(buckets)):
        members = np.asarray([i for i, b in enumerate(buckets) if b == bucket and np.isfinite(scores[i])], np.int64)
        for i in members:
            partners = members[np.abs(scores[members] - scores[i]) >= min_gap]
            for j in rng.permutation(partners)[:pairs_per_prompt]:
                chosen_rejected.add((int(i), int(j)) if scores[i] > scores[j] else (int(j), int(i)))
    return [{"prompt": SCORER_INSTRUCTION, "chosen": texts[c], "rejected": texts[r],
             "margin": float(scores[c] - scores[r]), "category": buckets[c]} for c, r in sorted(chosen_rejected)]


def scorer_config(config: ml_collections.ConfigDict, pairs: Sequence[dict], workdir: str
                  ) -> ml_collections.ConfigDict:
    """The rm stage's config (`config` as from configs/rm.py) that trains a prompt scorer on `pairs` into
    `workdir`: the pairs are written to workdir/scorer_pairs.jsonl and a held-out share
    (config.data.eval_fraction) is split off them for evaluation."""
    if not pairs:
        raise ValueError("no preference pairs to train the scorer on (are the scores all within min_gap?)")
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "scorer_pairs.jsonl")
    write_jsonl(path, list(pairs))
    config = ml_collections.ConfigDict(config.to_dict())
    config.stage = "rm"
    config.data.train, config.data.eval = path, ""
    return config


def load_scorer(workdir: str, batch_size: int = 8) -> Callable[[Sequence[str]], np.ndarray]:
    """score(texts) -> [len(texts)] float32 from a `train_scorer` run (higher = better prompt)."""
    score_fn = load_reward_model(workdir, batch_size=batch_size)
    instruction = [{"role": "user", "content": SCORER_INSTRUCTION}]
    return lambda texts: score_fn([instruction + [{"role": "assistant", "content": t}] for t in texts])
