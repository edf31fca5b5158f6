"""Evaluate checkpoints on the configured benchmarks; write results.json, summary.md and charts/ to workdir.

Generations and judgements are cached under workdir/cache, so rerunning the same command resumes where it
stopped and re-scores finished samples without generating or judging them again.
"""
from __future__ import annotations

import os

import ml_collections
from absl import logging

from alignment.config import Field, at_least, positive, suggest
from alignment.data.jsonl_cache import JsonlCache
from alignment.eval import benchmarks as benchmarks_lib
from alignment.eval import judge, report, runner, targets
from alignment.generation.client import chat
from alignment.rewards import sandbox


FIELDS = {
    "limit": at_least(0),
    "num_samples": positive(),
    "generation.temperature": Field(low=0),
    "generation.max_tokens": positive(),
    "generation.workers": positive(),
    "generation.chunk": positive(),
    "generation.timeout": Field(low=0, open_low=True),
    "pas.max_tokens": positive(),
    "judge.temperature": Field(low=0),
    "judge.max_tokens": positive(),
    "judge.attempts": positive(),
    "judge.workers": positive(),
    "sandbox.cpu_seconds": Field(low=0, open_low=True),
    "sandbox.wall_seconds": Field(low=0, open_low=True),
    "sandbox.memory_mb": positive(),
    "sandbox.workers": positive(),
    "arithmetic.num_problems": positive(),
    "arithmetic.max_operand": positive(),
    "arithmetic.num_ops": positive(),
    "arithmetic.max_tokens": positive(),
}


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def checkpoints(config: ml_collections.ConfigDict) -> dict[str, str]:
    """{name: target} from config.checkpoints ('name=target,...'), else config.endpoint or config.init_from, else
    the embedded model (config.model at random init: the offline default)."""
    pairs = {}
    for entry in _names(config.checkpoints):
        name, sep, target = entry.partition("=")
        if not sep or not name.strip() or not target.strip():
            raise ValueError(f"config.checkpoints entry {entry!r} is not name=target")
        pairs[name.strip()] = target.strip()
    if not pairs and config.endpoint:
        pairs[config.model_name] = config.endpoint
    if not pairs and config.init_from:
        pairs[os.path.basename(os.path.normpath(config.init_from))] = config.init_from
    if not pairs:
        logging.info("no checkpoints, endpoint or init_from given: evaluating the embedded model (config.model at "
                     "random init from seed %d)", config.seed)
        pairs[targets.EMBEDDED] = targets.EMBEDDED
    return pairs


def options(config: ml_collections.ConfigDict, name: str) -> tuple[dict, int]:
    """(the loader's keyword options, max new tokens per response) of benchmark `name`: its config block's
    (e.g. config.arithmetic), else none and config.generation.max_tokens."""
    block = benchmarks_lib.BENCHMARKS[name].options
    fields = config[block].to_dict() if block else {}
    return fields, fields.pop("max_tokens", config.generation.max_tokens)


def context(config: ml_collections.ConfigDict, workdir: str) -> benchmarks_lib.Context:
    j, s = config.judge, config.sandbox
    judge_fn = None
    if j.endpoint:
        ask = lambda prompt: chat(j.endpoint, [{"role": "user", "content": prompt}], model=j.model,
                                  temperature=j.temperature, max_tokens=j.max_tokens)
        cache = JsonlCache(os.path.join(workdir, "cache", "judgements.jsonl"))
        judge_fn = lambda items: judge.judge_checklists(items, ask, cache, judge_id=f"{j.endpoint}|{j.model}",
                                                        attempts=j.attempts, workers=j.workers)
    limits = sandbox.Limits(cpu_seconds=s.cpu_seconds, wall_seconds=s.wall_seconds,
                            memory_bytes=int(s.memory_mb) << 20)
    pass_k = tuple(int(k) for k in _names(config.pass_k))
    if any(k > config.num_samples for k in pass_k):
        raise ValueError(f"config.pass_k={config.pass_k!r} needs config.num_samples >= {max(pass_k)}")
    return benchmarks_lib.Context(judge=judge_fn, sandbox_limits=limits, pass_k=pass_k, sandbox_workers=s.workers)


def data_file(config: ml_collections.ConfigDict, name: str) -> str:
    """The file benchmark `name` reads: config.data.<name>, else the copy shipped with the package; '' for a
    benchmark without a file. A missing one is an error saying where to get it and what it must hold."""
    path = benchmarks_lib.data_path(name, config.data.get(name, ""))
    if path and not os.path.isfile(path):
        raise ValueError(f"config.data.{name}={path!r} is not a file; it should be "
                         f"{benchmarks_lib.BENCHMARKS[name].source}")
    return path


def check(config: ml_collections.ConfigDict) -> None:
    """Every benchmark named, with its judge and its data file, before any model is asked anything."""
    names = _names(config.benchmarks)
    if not names:
        raise ValueError(f"config.benchmarks is empty; available: {sorted(benchmarks_lib.BENCHMARKS)}")
    for name in names:
        if name not in benchmarks_lib.BENCHMARKS:
            raise ValueError(f"config.benchmarks: unknown benchmark {name!r}.{suggest(name, benchmarks_lib.BENCHMARKS)}"
                             f" Available: {sorted(benchmarks_lib.BENCHMARKS)}")
        data_file(config, name)
        if benchmarks_lib.BENCHMARKS[name].judged and not config.judge.endpoint:
            raise ValueError(f"benchmark {name!r} is judged by an LLM: set config.judge.endpoint")


def load_samples(config: ml_collections.ConfigDict) -> dict[str, list[dict]]:
    """Samples per benchmark (copied config.num_samples times where sampled); skipped ones are warned about here
    and reported by the runner."""
    samples = {}
    for name in _names(config.benchmarks):
        spec = benchmarks_lib.BENCHMARKS[name]
        path = data_file(config, name)
        loaded = spec.load(path, config.limit, config.seed, **options(config, name)[0])
        kept, skipped = benchmarks_lib.split_skipped(loaded)
        if skipped:
            logging.warning("%s: skipping %d of %d samples that cannot be scored (listed in results.json and "
                            "summary.md): %s", name, len(skipped), len(loaded), ", ".join(s["id"] for s in skipped))
        if not kept:
            reason = f" ({len(skipped)} skipped; the first because {skipped[0]['reason']})" if skipped else ""
            raise ValueError(f"benchmark {name!r}: no samples to score in {path}{reason}")
        copies = config.num_samples if spec.sampled else 1
        samples[name] = runner.expand(loaded, copies)
        logging.info("%s: %d samples x %d responses from %s", name, len(kept), copies, path or "the embedded task")
    return samples


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    models = checkpoints(config)
    ctx = context(config, workdir)
    samples = load_samples(config)
    g = config.generation
    results = {}
    for name, target in models.items():
        generate_fn = targets.make_generate_fn(config, target, name)
        generator_id = f"{target}|{name}|{g.temperature}|{config.pas.target}|{config.seed}"
        results[name] = {}
        for bench, bench_samples in samples.items():
            cache = JsonlCache(os.path.join(workdir, "cache", name, f"{bench}.jsonl"))
            results[name][bench] = runner.evaluate(bench, bench_samples, generate_fn, ctx, cache, generator_id,
                                                   max_tokens=options(config, bench)[1], chunk=g.chunk)
            logging.info("%s / %s: %s", name, bench, results[name][bench]["metrics"])
    paths = report.write_report(results, workdir)
    logging.info("report: %s", paths)
    return {name: {bench: r["metrics"] for bench, r in per.items()} for name, per in results.items()}
