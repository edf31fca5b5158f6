"""Shared benchmark helpers: shared-data paths, the bench-small model, timing, JSON output."""
from __future__ import annotations

import json
import os
import pathlib
import platform
import resource
import statistics
import sys
import time

import jax

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def require_shared() -> pathlib.Path:
    if not SHARED.is_dir():
        print(json.dumps({"skipped": f"shared data not found at {SHARED}"}))
        sys.exit(0)
    return SHARED


def bench_small_config(**overrides):
    from alignment.models import from_hf_config

    return from_hf_config(str(require_shared() / "peers" / "bench-small" / "config.json"), **overrides)


def one_b_config(**overrides):
    """A Llama-shaped model of 1.1B parameters (TinyLlama's shape), random weights, full rematerialisation."""
    from alignment.models import ModelConfig

    fields = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
                  num_kv_heads=4, remat_policy="full")
    return ModelConfig(**{**fields, **overrides})


def llama2_tokenizer():
    from alignment.data.tokenizer import load_tokenizer

    return load_tokenizer(str(require_shared() / "tokenizers" / "llama2" / "tokenizer.model"))


def gsm8k(split: str = "train", n: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in open(require_shared() / "gsm8k" / f"{split}.jsonl")]
    return rows[:n] if n else rows


def timed(fn, *args, repeats: int = 5, warmup: int = 2) -> tuple[float, list[float]]:
    """Median seconds of `fn(*args)` (blocking on its result) after `warmup` calls."""
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), times


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict:
    return {"jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count(),
            "cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()[0]}


def emit(name: str, **fields) -> None:
    print(json.dumps({"bench": name, **fields, "machine": machine()}), flush=True)
