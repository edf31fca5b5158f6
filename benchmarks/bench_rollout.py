"""A long-tailed RL rollout on bench-small: the continuous-batching engine vs the static engine vs transformers.

    PYTHONPATH=. python benchmarks/bench_rollout.py [--repeats 2] [--hf_python ~/.cache/alignment-peers/trl/bin/python]

Workload (one RL step's rollout): 64 GSM8K train questions as llama2-template chats (llama2 tokenizer), 4 samples
each at temperature 1, bench-small with random weights in float32 on CPU. Completion budgets are long-tailed, as
GSM8K answers are (40-400 tokens): one per prompt, lognormal with median 100, clipped to [40, 400]; random weights
almost never draw EOS, so every row generates exactly its budget and all engines do the same useful work.
  * v2: `alignment.generation.engine.Engine` as the RL stages build it (default slots), one generate call;
  * static: the engine it replaced (`benchmarks.static_engine`), one generate call as the RL loop made it: every
    row of the step in one batch, decoded until the longest budget;
  * transformers: `generate` in the peer venv (`benchmarks/bench_rollout_hf.py`), 16 prompts x 4 samples per
    call (its memory for all 256 rows at once is the static engine's), each call to its longest budget.
Generated tokens/s counts the budgets' tokens only (what RL trains on). The engines run in turn, A B C A B C,
after one untimed warm-up call each (compiles). --memory adds the KV memory of 64 such sequences in flight at once
(`kv_memory`).
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import tempfile
import time

import flax.linen as nn
import jax
import numpy as np

from alignment import sharding
from alignment.data.chat import encode_chat
from alignment.generation.engine import Engine
from alignment.generation.sampling import SamplingParams
from alignment.models import Transformer
from alignment.models.transformer import dummy_inputs
from benchmarks import common, static_engine

SAMPLES = 4
SAMPLING = SamplingParams(temperature=1.0)


def workload(prompts: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """(prompt token ids, per-prompt completion budgets)."""
    tokenizer = common.llama2_tokenizer()
    questions = [row["question"] for row in common.gsm8k("train", prompts)]
    ids = [encode_chat(tokenizer, [{"role": "user", "content": q}], "llama2", add_generation_prompt=True).ids.tolist()
           for q in questions]
    budgets = np.clip(np.random.default_rng(seed).lognormal(np.log(100), 0.6, prompts), 40, 400).astype(int)
    return ids, budgets.tolist()


def cpu_name() -> dict:
    info = open("/proc/cpuinfo").read()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    return {"cpu": model, "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_tile" in flags}


def run_hf(python: str, prompts, budgets, seed: int) -> float:
    """Seconds of the transformers run in the peer venv."""
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "workload.json"
        path.write_text(json.dumps({"prompts": prompts, "budgets": budgets, "samples": SAMPLES, "seed": seed}))
        script = pathlib.Path(__file__).with_name("bench_rollout_hf.py")
        out = subprocess.run([python, str(script), str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def kv_memory(config, params, mesh, prompts, budgets) -> dict:
    """Peak KV bytes of 64 sequences (16 prompts x 4 samples) with long-tailed lengths, all in flight at once:
    the paged cache's pages in use at its peak (shared prompt pages counted once) against the static engine's
    cache, allocated for rows x (prompt bucket + new-token bucket) slots."""
    prompts, budgets = prompts[:64 // SAMPLES], budgets[:64 // SAMPLES]
    engine = Engine(config, params, mesh, sharding.DEFAULT_RULES, pad_id=0, slots=64,
                    pages=64 * -(-(max(map(len, prompts)) + max(budgets)) // 16) + 1)
    engine.generate(prompts, budgets, SAMPLING, num_samples=SAMPLES)
    stats = engine.stats()
    static = static_engine.load()
    slots = static.bucket(max(map(len, prompts))) + static.bucket(max(budgets))
    per_token = stats["page_bytes"] // engine.page_size
    return {"kv_sequences": 64, "kv_paged_peak_bytes": stats["peak_pages"] * stats["page_bytes"],
            "kv_static_bytes": 64 * slots * per_token,
            "kv_tokens_in_flight_peak": stats["peak_pages"] * engine.page_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per engine, in turn")
    parser.add_argument("--engines", default="v2,static", help="comma-separated: v2, static")
    parser.add_argument("--slots", type=int, default=0, help="v2 decode slots; 0 = the engine's default")
    parser.add_argument("--hf_python", default="", help="the peer venv's python; '' = no transformers run")
    parser.add_argument("--memory", action="store_true", help="also measure the KV memory of 64 sequences")
    args = parser.parse_args()

    config = common.bench_small_config()
    model = Transformer(config)
    params = jax.jit(lambda k: nn.meta.unbox(model.init(k, *dummy_inputs())["params"]))(jax.random.key(0))
    mesh = sharding.make_mesh({"data": -1})
    prompts, budgets = workload(args.prompts)
    tokens = SAMPLES * sum(budgets)
    options = {"slots": args.slots} if args.slots else {}
    builders = {"v2": lambda: Engine(config, params, mesh, sharding.DEFAULT_RULES, pad_id=0, **options),
                "static": lambda: static_engine.load().Engine(config, params, mesh, sharding.DEFAULT_RULES, pad_id=0)}
    engines = {name: builders[name]() for name in args.engines.split(",")}
    calls = {name: (lambda e=e, seed=0: e.generate(prompts, budgets, SAMPLING, num_samples=SAMPLES, seeds=seed))
             for name, e in engines.items()}
    if args.hf_python:
        calls["transformers"] = lambda seed=0: run_hf(args.hf_python, prompts, budgets, seed)

    result = {"bench": "rollout", "model": "bench-small", "dtype": "float32", "prompts": len(prompts),
              "samples": SAMPLES, "budget_quantiles": np.percentile(budgets, [0, 50, 90, 100]).tolist(),
              "prompt_tokens_mean": round(float(np.mean([len(p) for p in prompts])), 1), "generated_tokens": tokens,
              **cpu_name(), "load_avg_start": os.getloadavg()[0]}
    for name, call in calls.items():  # warm-up: compiles
        start = time.perf_counter()
        out = call()
        result[f"{name}_first_call_s"] = round(time.perf_counter() - start, 1)
        if name != "transformers":
            assert int(out.lengths.sum()) == tokens, f"{name}: every row must generate its budget"
    seconds = {name: [] for name in calls}
    for repeat in range(args.repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            timed = call(seed=repeat + 1)
            seconds[name].append(timed if name == "transformers" else time.perf_counter() - start)
    for name, values in seconds.items():
        result[f"{name}_tokens_per_s"] = round(tokens / statistics.median(values), 1)
        result[f"{name}_seconds"] = [round(v, 1) for v in values]
    for other in ("static", "transformers"):
        if "v2" in seconds and other in seconds:
            result[f"v2_vs_{other}"] = round(result["v2_tokens_per_s"] / result[f"{other}_tokens_per_s"], 2)
    if "v2" in engines:
        stats = engines["v2"].stats()
        result.update(v2_slots=engines["v2"].slots, v2_preemptions=stats["preemptions"],
                      v2_peak_running=stats["peak_running"])
    result["load_avg_end"] = os.getloadavg()[0]
    if args.memory:
        result.update(kv_memory(config, params, mesh, prompts, budgets))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
