"""The hardware bound of one decode step of bench-small: bytes of weights and KV cache read vs the measured memory
bandwidth, and matmul FLOPs vs the measured matmul peak, per dtype and batch.

    python -m benchmarks.bench_decode_bound [--batches 16,1] [--prompt_len 64] [--new_tokens 128]

A decode step reads every weight matrix the step multiplies by (the layers and the output head; the embedding
only as the batch's rows) and each row's keys and values so far (on average prompt_len + new_tokens / 2 of them),
and does 2 FLOPs per weight per row. Bandwidth: the faster of a 1-thread and an all-threads sum of a 1 GiB
float32 array (median of 5; far larger than any cache, so DRAM's read rate; on a shared machine, what the others
leave). A copy's rate (bytes read + written) is reported too but not used: a decode step reads, it barely writes. The bound
tokens/s is batch / max(bytes / bandwidth, FLOPs / matmul peak); a measured tokens/s divided by it says how close
the engine is. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import time

import numpy as np

from alignment.train.metrics import measure_matmul_tflops
from benchmarks import common


def read_bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> dict:
    """DRAM GB/s over a `gib` GiB float32 array, single-threaded and split over os.cpu_count() threads: numpy sums
    (bytes read) and copies (bytes read + written)."""
    data = np.ones(int(gib * 2 ** 30) // 4, np.float32)
    out = np.empty_like(data)
    threads = os.cpu_count() or 1
    parts, out_parts = np.array_split(data, threads), np.array_split(out, threads)
    result = {}
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for name, moved, work in (
                ("sum_1_thread", data.nbytes, lambda: data.sum()),
                (f"sum_{threads}_threads", data.nbytes, lambda: list(pool.map(np.sum, parts))),
                (f"copy_{threads}_threads", 2 * data.nbytes, lambda: list(pool.map(np.copyto, out_parts, parts)))):
            work()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                work()
                times.append(time.perf_counter() - start)
            result[name] = round(moved / statistics.median(times) / 1e9, 2)
    return result


def step_traffic(config, batch: int, context: float, weight_bytes: int, cache_bytes: int) -> tuple[float, float]:
    """(bytes read, FLOPs) of one decode step of `batch` rows with `context` cached tokens each."""
    norms = (2 * config.num_layers + 1) * config.hidden_size  # read, but no matmul
    head = config.vocab_size * config.hidden_size
    matmul_weights = config.num_params() - head * (2 - config.tie_embeddings) - norms + head
    embedding_rows = batch * config.hidden_size
    kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim
    read = (matmul_weights + norms + embedding_rows) * weight_bytes + batch * context * kv_per_token * cache_bytes
    return read, 2.0 * matmul_weights * batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="16,1")
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=128)
    args = parser.parse_args()
    config = common.bench_small_config()
    bandwidth = read_bandwidth_gbs()
    best_gbs = max(gbs for name, gbs in bandwidth.items() if name.startswith("sum_"))
    context = args.prompt_len + args.new_tokens / 2
    result = {"bench": "decode_bound", "model": "bench-small", "read_gbs": bandwidth, "bound_gbs": best_gbs, "context_mean": context,
              "load_avg": os.getloadavg()[0]}
    for dtype, size in (("float32", 4), ("bfloat16", 2)):
        peak = measure_matmul_tflops(1024, dtype=dtype) * 1e12
        result[f"{dtype}_matmul_gflops"] = round(peak / 1e9, 1)
        for batch in (int(b) for b in args.batches.split(",")):
            read, flops = step_traffic(config, batch, context, size, size)
            step_s = max(read / (best_gbs * 1e9), flops / peak)
            result[f"{dtype}_b{batch}"] = {
                "mb_read_per_step": round(read / 1e6, 1), "gflop_per_step": round(flops / 1e9, 3),
                "memory_ms": round(read / (best_gbs * 1e9) * 1e3, 2), "compute_ms": round(flops / peak * 1e3, 2),
                "bound_tokens_per_s": round(batch / step_s, 1)}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
