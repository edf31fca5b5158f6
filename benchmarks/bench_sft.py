"""SFT throughput of bench-small on GSM8K train as chat, max length 1024, ~4096 tokens per step.

    python -m benchmarks.bench_sft packed 12 [logprob_impl] [attention_impl] [--dtype bfloat16]
    python -m benchmarks.bench_sft unpacked 12 [logprob_impl] [attention_impl]

logprob_impl: '' (the backend default: the fused blockwise kernel) or 'reference' (materialised logits).
attention_impl: 'xla_flash' (default, as configs/sft.py: skips the tiles between packed samples) or 'xla'
(dense scores).

Same work as `../shared/peers/bench_sft_trl.py` (3000 GSM8K rows, assistant-only loss, 4 packed rows
or 16 unpacked rows per step). --dtype is the compute dtype (parameters stay float32; default float32).
Prints real tokens/s, token utilisation and MFU against the matmul peak measured in that dtype.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import ml_collections
import numpy as np

from alignment import sharding
from alignment.algorithms.sft import sft_loss
from alignment.data import sft as sft_data
from alignment.models import Transformer
from alignment.models.transformer import dummy_inputs
from alignment.train.metrics import measure_matmul_tflops
from alignment.train.optimizer import make_optimizer
from alignment.train.state import init_state, state_shardings
from alignment.train.step import jit_train_step, make_train_step
from benchmarks import common


def main(mode: str = "packed", steps: int = 12, logprob_impl: str = "", attention_impl: str = "xla_flash",
         dtype: str = "float32") -> None:
    packed = mode == "packed"
    tokenizer = common.llama2_tokenizer()
    rows = [{"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
            for r in common.gsm8k("train", 3000)]
    encode = functools.partial(sft_data.chat_example, tokenizer, "llama2", "all_assistant")
    examples = [encode(r["messages"]) for r in rows]
    longest = max(len(e["inputs"]) for e in examples)
    # Unpacked rows are padded to the longest sample (rounded to 64): fixed shapes, nothing truncated.
    max_length = 1024 if packed else -(-longest // 64) * 64
    batch_size = 4 if packed else 16
    data = ml_collections.ConfigDict(dict(max_length=max_length, packing=packed, pack_buffer=1024))
    sources = ml_collections.ConfigDict(dict(gsm8k=dict(weight=1.0)))
    batches = iter(sft_data.train_batches({"gsm8k": examples}, sources, data, batch_size, seed=0))

    config = common.bench_small_config(logprob_impl=logprob_impl, attention_impl=attention_impl, dtype=dtype)
    model = Transformer(config)
    mesh = sharding.make_mesh({"data": 1})
    opt_cfg = ml_collections.ConfigDict(dict(lr=1e-4, warmup_steps=0, schedule="constant", end_lr_factor=1.0,
                                             b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0))
    optimizer, schedule = make_optimizer(opt_cfg, steps)
    _, shardings = state_shardings(model, optimizer, mesh, sharding.DEFAULT_RULES, dummy_inputs())
    state = init_state(model, optimizer, shardings, 0, dummy_inputs())
    target = sharding.named_sharding(mesh, sharding.DEFAULT_RULES, "batch", "seq")
    step = jit_train_step(make_train_step(functools.partial(sft_loss, model), optimizer, schedule), shardings, target)

    times, tokens = [], []
    for i in range(steps):
        batch = jax.device_put(next(batches), target)
        start = time.perf_counter()
        state, metrics = step(state, batch)
        real = float(metrics["tokens"])  # blocks on the step
        times.append(time.perf_counter() - start)
        tokens.append(real)
    median = statistics.median(times[2:])
    per_step = float(np.mean(tokens[2:]))
    peak = measure_matmul_tflops(2048, dtype=dtype) * 1e12
    common.emit(f"sft_{mode}", steps=steps, rows_per_step=batch_size, max_length=max_length,
                median_step_s=round(median, 3), real_tokens_per_step=round(per_step),
                real_tokens_per_s=round(per_step / median, 1),
                utilisation=round(per_step / (batch_size * max_length), 3),
                mfu=round(per_step * config.flops_per_token(max_length) / median / peak, 3),
                matmul_peak_gflops=round(peak / 1e9, 1), peak_rss_mb=round(common.peak_rss_mb()),
                compile_and_first_step_s=round(times[0], 1), dtype=dtype, param_dtype=config.param_dtype,
                logprob_impl=logprob_impl or "default", attention_impl=attention_impl)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", nargs="?", default="packed", choices=("packed", "unpacked"))
    parser.add_argument("steps", nargs="?", type=int, default=12)
    parser.add_argument("logprob_impl", nargs="?", default="")
    parser.add_argument("attention_impl", nargs="?", default="xla_flash")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    args = parser.parse_args()
    main(args.mode, args.steps, args.logprob_impl, args.attention_impl, args.dtype)
