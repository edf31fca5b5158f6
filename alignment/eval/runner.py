"""Evaluate one benchmark with one generate_fn, caching generations so a resumed run skips finished samples.

Used by the eval stage for checkpoint comparisons, and usable as is by a training loop's periodic monitoring
(pass a fresh cache path, or an in-memory one, per step).
"""
from __future__ import annotations

from absl import logging

from alignment.data.jsonl_cache import JsonlCache, input_hash
from alignment.eval.benchmarks import BENCHMARKS, Context, split_skipped
from alignment.eval.endpoint import GenerateFn


def expand(samples: list[dict], num_samples: int) -> list[dict]:
    """Each sample `num_samples` times (for pass@k); copies share the id and differ in `copy`."""
    return [{**s, "copy": c} for s in samples for c in range(num_samples)]


def _prompt(sample: dict):
    """What a response depends on: the messages, and the tool definitions of a function-calling sample."""
    return sample["messages"] if "tools" not in sample else {"messages": sample["messages"], "tools": sample["tools"]}


def generate_cached(samples: list[dict], generate_fn: GenerateFn, cache: JsonlCache, generator_id: str,
                    max_tokens: int, chunk: int = 64) -> list[str]:
    """Responses of at most `max_tokens` new tokens for every sample, generating only those missing from `cache`,
    `chunk` at a time (each chunk is on disk before the next starts). `generator_id` names the model and sampling
    settings."""
    generator_id = f"{generator_id}|{max_tokens}"
    keys = [f"{s['id']}#{s.get('copy', 0)}:{input_hash(generator_id, _prompt(s))}" for s in samples]
    todo = [i for i, k in enumerate(keys) if cache.get(k) is None]
    if len(todo) < len(samples):
        logging.info("%d of %d responses cached; generating %d", len(samples) - len(todo), len(samples), len(todo))
    for start in range(0, len(todo), max(1, chunk)):
        batch = todo[start:start + chunk]
        prompts = [samples[i]["messages"] for i in batch]
        if any("tools" in samples[i] for i in batch):
            responses = generate_fn(prompts, max_tokens, tools=[samples[i].get("tools") for i in batch])
        else:
            responses = generate_fn(prompts, max_tokens)
        if len(responses) != len(batch):
            raise RuntimeError(f"generate_fn returned {len(responses)} responses for {len(batch)} prompts")
        for i, response in zip(batch, responses):
            cache.put(keys[i], {"response": response})
    return [cache.get(k)["response"] for k in keys]


def evaluate(benchmark: str, samples: list[dict], generate_fn: GenerateFn, ctx: Context, cache: JsonlCache,
             generator_id: str, max_tokens: int, chunk: int = 64) -> dict:
    """{"metrics", "categories", "samples": per-sample results with their responses, ...}; samples the loader
    skipped get no response and are listed in "skipped" ([{"id", "reason"}]) and counted in counts["skipped"]."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; available: {sorted(BENCHMARKS)}")
    samples, skipped = split_skipped(samples)
    if not samples:
        raise ValueError(f"benchmark {benchmark!r} has no samples ({len(skipped)} skipped)")
    spec = BENCHMARKS[benchmark]
    responses = generate_cached(samples, generate_fn, cache, generator_id, max_tokens, chunk)
    results = spec.score(samples, responses, ctx)
    for result, response in zip(results, responses):
        result["response"] = response
    evaluation = {**spec.aggregate(results, ctx), "samples": results}
    if skipped:
        evaluation["counts"] = {**evaluation.get("counts", {}), "skipped": len(skipped)}
        evaluation["skipped"] = skipped
    return evaluation
