"""Generated tokens/s of the rollout engine on bench-small (random weights), as the transformers peer measures it.

    PYTHONPATH=. python benchmarks/bench_generate.py [--repeats 3] [--batches 16,1] [--config other/config.json]

64-token random prompts, exactly 128 new tokens (no stop ids), batch 16 and batch 1, greedy and top-p 0.9.
Prints one JSON line; medians over repeats after one compile-and-warm-up call per setting.
"""
from __future__ import annotations

import argparse
import json
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
from benchmarks import common

MODES = {"greedy": SamplingParams(temperature=0.0), "top_p": SamplingParams(temperature=1.0, top_p=0.9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="", help="HF config.json of the model; default bench-small")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per setting")
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--batches", default="16,1", help="comma-separated batch sizes")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="weights, compute and KV cache dtype (the transformers peer runs float32)")
    args = parser.parse_args()

    dtypes = dict(param_dtype=args.dtype, dtype=args.dtype)
    config = from_hf_config(args.config, **dtypes) if args.config else common.bench_small_config(**dtypes)
    model = Transformer(config)
    params = jax.jit(lambda k: nn.meta.unbox(model.init(k, *dummy_inputs())["params"]))(jax.random.key(0))
    engine = Engine(config, params, sharding.make_mesh({"data": -1}), sharding.DEFAULT_RULES, pad_id=0)
    rng = np.random.default_rng(1)
    result = {"bench": "generate", "model": args.config or "bench-small", "dtype": args.dtype,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "devices": jax.device_count(),
              "platform": jax.devices()[0].platform}
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = rng.integers(3, config.vocab_size, (batch, args.prompt_len)).tolist()
        for mode, params_ in MODES.items():
            run = lambda: engine.generate(prompts, args.new_tokens, params_, seeds=0)
            start = time.perf_counter()
            out = run()
            compile_s = time.perf_counter() - start
            assert int(out.lengths.sum()) == batch * args.new_tokens, "every row must produce all its tokens"
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            result[f"b{batch}_{mode}_tokens_per_s"] = round(batch * args.new_tokens / statistics.median(times), 1)
            result[f"b{batch}_{mode}_first_call_s"] = round(compile_s, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
