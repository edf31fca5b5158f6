"""Generated tokens/s of the rollout engine on bench-small (random weights), as the transformers peer measures it.

    PYTHONPATH=. python benchmarks/bench_generate.py [--repeats 3] [--batches 16,1] [--engines v2,static]

64-token random prompts, exactly 128 new tokens (no stop ids), batch 16 and batch 1, greedy and top-p 0.9.
`--engines v2,static` also runs the static engine the continuous-batching one replaced (`benchmarks.static_engine`),
the two in turn (A B A B) for each setting. Prints one JSON line; medians over repeats after one compile-and-warm-up
call per setting.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import flax.linen as nn
import jax
import numpy as np

from alignment import sharding
from alignment.generation.engine import Engine
from alignment.generation.sampling import SamplingParams
from alignment.models import Transformer, from_hf_config
from alignment.models.transformer import dummy_inputs
from benchmarks import common, static_engine

MODES = {"greedy": SamplingParams(temperature=0.0), "top_p": SamplingParams(temperature=1.0, top_p=0.9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="", help="HF config.json of the model; default bench-small")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per setting")
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--batches", default="16,1", help="comma-separated batch sizes")
    parser.add_argument("--engines", default="v2", help="comma-separated: v2 (the engine), static (the one before)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="weights, compute and KV cache dtype (the transformers peer runs float32)")
    args = parser.parse_args()

    dtypes = dict(param_dtype=args.dtype, dtype=args.dtype)
    config = from_hf_config(args.config, **dtypes) if args.config else common.bench_small_config(**dtypes)
    model = Transformer(config)
    params = jax.jit(lambda k: nn.meta.unbox(model.init(k, *dummy_inputs())["params"]))(jax.random.key(0))
    mesh = sharding.make_mesh({"data": -1})
    builders = {"v2": Engine, "static": lambda *a, **k: static_engine.load().Engine(*a, **k)}
    engines = {name: builders[name](config, params, mesh, sharding.DEFAULT_RULES, pad_id=0)
               for name in args.engines.split(",")}
    rng = np.random.default_rng(1)
    result = {"bench": "generate", "model": args.config or "bench-small", "dtype": args.dtype,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "devices": jax.device_count(),
              "platform": jax.devices()[0].platform, "load_avg_start": os.getloadavg()[0]}
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = rng.integers(3, config.vocab_size, (batch, args.prompt_len)).tolist()
        for mode, sampling in MODES.items():
            runs = {name: (lambda e=e: e.generate(prompts, args.new_tokens, sampling, seeds=0))
                    for name, e in engines.items()}
            times = {name: [] for name in runs}
            for name, run in runs.items():
                start = time.perf_counter()
                out = run()
                result[f"{name}_b{batch}_{mode}_first_call_s"] = round(time.perf_counter() - start, 1)
                assert int(out.lengths.sum()) == batch * args.new_tokens, "every row must produce all its tokens"
            for _ in range(args.repeats):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
            for name, values in times.items():
                result[f"{name}_b{batch}_{mode}_tokens_per_s"] = round(
                    batch * args.new_tokens / statistics.median(values), 1)
    result["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
