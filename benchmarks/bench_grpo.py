"""GRPO step time on bench-small with GSM8K prompts, with the generation / scoring / update breakdown.

    python -m benchmarks.bench_grpo [--steps 5] [--kl_mode k3] [--dtype float32]
    python -m benchmarks.bench_grpo --lora=nf4      # rank-16 adapters on the frozen (here nf4) base; one mode a run
    python -m benchmarks.bench_grpo --model=1b --dtype=bfloat16 --param_dtype=bfloat16 --steps=2 --lora=lora

The same work as the TRL peer (`shared/peers/bench_grpo_trl.py`): bench-small with random weights, the llama2
tokenizer, the first 200 GSM8K train questions, 2 prompts x 8 samples per step, 128 new tokens at temperature 1,
beta 0.04, one policy update per step; `--dtype` is the compute dtype over float32 parameters (float32 by default;
bfloat16 is the class of TRL's default bf16 autocast). It runs the GRPO stage itself (alignment/stages/grpo.py)
and reads its per-step timings from metrics.jsonl; the first step (compilation) is left out of the median.
`--lora` trains rank-16 adapters (alpha 32) instead of every weight, on a base kept in the compute dtype or
quantised (int8, nf4); run each mode in its own process so its peak RSS is its own.
`benchmarks/side_by_side.py` runs it beside the peer.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time

import ml_collections

from alignment.config import config_path, load_config_file
from alignment.stages import grpo
from benchmarks import common


def model_fields(name: str, param_dtype: str) -> dict:
    config = common.one_b_config() if name == "1b" else common.bench_small_config()
    return {**dataclasses.asdict(config), "param_dtype": param_dtype}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--kl_mode", default="k3", choices=("k3", "token_reward"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--attention_impl", default="xla", choices=("xla", "xla_flash"))
    parser.add_argument("--logprob_impl", default="",
                        help="'' (fused blockwise head) or 'reference' (materialised logits)")
    parser.add_argument("--lora", default="off", choices=("off", "lora", "int8", "nf4"))
    parser.add_argument("--model", default="bench-small", choices=("bench-small", "1b"))
    parser.add_argument("--param_dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    shared = common.require_shared()

    workdir = tempfile.mkdtemp(prefix="bench-grpo-")
    rows = [{"messages": [{"role": "user", "content": r["question"]}], "answer": r["answer"].split("####")[-1].strip()}
            for r in common.gsm8k("train", 200)]
    prompts, held_out = os.path.join(workdir, "gsm8k.jsonl"), os.path.join(workdir, "held_out.jsonl")
    for path, subset in ((prompts, rows), (held_out, rows[:2])):  # the stage's before/after check: 2 prompts
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in subset)

    config = load_config_file(config_path("grpo"))
    config.model.update(model_fields(args.model, args.param_dtype))
    config.model.dtype = args.dtype
    config.model.attention_impl = args.attention_impl
    config.model.logprob_impl = args.logprob_impl
    config.tokenizer = str(shared / "tokenizers" / "llama2" / "tokenizer.model")
    config.chat_template = "llama2"
    config.warm_start = None
    config.steps = args.steps
    config.checkpoint.every = 0
    config.rl.update(dict(prompts_per_step=2, num_samples=8, max_new_tokens=128, max_prompt_length=256,
                          temperature=1.0, beta=0.04, kl_mode=args.kl_mode, eval_every=0, reweight_categories=False))
    source = lambda path: ml_collections.ConfigDict(dict(path=path, weight=1.0, format="auto", tfds_data_dir=""))
    config.data.train = ml_collections.ConfigDict({"gsm8k": source(prompts)})
    config.data.eval = ml_collections.ConfigDict({"gsm8k": source(held_out)})
    config.data.num_embedded_eval = 0
    config.optimizer.lr = 1e-6
    config.lora.enabled = args.lora != "off"
    config.lora.quantize = args.lora if args.lora in ("int8", "nf4") else "none"
    config.lora.rank, config.lora.alpha = 16, 32.0

    start = time.perf_counter()
    grpo.run(config, workdir)
    wall = time.perf_counter() - start
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "generation_s" in r]
    timed = steps[1:]
    parts = ("generation_s", "scoring_s", "update_s")
    median = {p: statistics.median(r[p] for r in timed) for p in parts}
    step_s = statistics.median(sum(r[p] for p in parts) for r in timed)
    print(json.dumps({
        "bench": "grpo", "model": args.model, "param_dtype": args.param_dtype, "kl_mode": args.kl_mode, "dtype": args.dtype,
        "attention_impl": args.attention_impl,
        "logprob_impl": args.logprob_impl or "default", "lora": args.lora, "steps_timed": len(timed),
        "median_step_s": round(step_s, 3), **{f"median_{p}": round(v, 3) for p, v in median.items()},
        "step_s": [round(sum(r[p] for p in parts), 2) for r in timed],
        "mean_completion_length": round(statistics.mean(r["completion_length"] for r in steps), 1),
        "wall_s": round(wall, 1), "peak_rss_mb": round(common.peak_rss_mb()),
        "machine": common.machine()}))


if __name__ == "__main__":
    main()
