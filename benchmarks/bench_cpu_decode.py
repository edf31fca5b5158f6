"""The CPU decode kernels (`kernels/cpu_decode`) against the XLA:CPU ops they replace, on bench-small's shapes.

    python -m benchmarks.bench_cpu_decode [--rows 1,2,8,16] [--length 192]

matmul: every projection and the head of one decode step of bench-small (8 layers of q, k, v, o, gate, up, down
and the 512 x 32000 head: 81 MB of bf16 weights, larger than the caches), for `rows` rows, one jitted program per
side: XLA's bf16 x bf16 -> f32 dot over [K, N] weights vs `cpu_decode.matmul` over the same weights packed.
Reported as ms per step and GB/s of weights read. attention: one layer's decode attention (8 heads over 4 kv
heads of 64, `length` cached positions) for `rows` rows, 100 calls chained in one program (each call's query
depends on the last, so none is hoisted): `paged_attention.xla.dense_attention` vs `cpu_decode.attention`.
Prints one JSON line; medians of 5 timings after a warm-up call.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from alignment_kernels.cpu_decode import api as cpu_decode
from alignment_kernels.paged_attention import xla as paged_xla

LAYERS = 8
SHAPES = [(512, 512), (512, 256), (512, 256), (512, 512), (512, 1408), (512, 1408), (1408, 512)] * LAYERS \
    + [(512, 32000)]  # q, k, v, o, gate, up, down per layer; the head


def _median_ms(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def matmuls(rows: int, rng) -> dict:
    weights = [jnp.asarray(rng.standard_normal(shape) * 0.05, jnp.bfloat16) for shape in SHAPES]
    packed = [cpu_decode.pack(w) for w in weights]
    x = jnp.asarray(rng.standard_normal((rows, 1408)), jnp.bfloat16)
    gigabytes = sum(w.size * 2 for w in weights) / 1e9

    def xla(x, weights):
        return sum(jnp.dot(x[:, :k], w, preferred_element_type=jnp.float32).sum()
                   for w, (k, _) in zip(weights, SHAPES))

    def kernel(x, packed):
        return sum(cpu_decode.matmul(x[:, :k], p, n).sum() for p, (k, n) in zip(packed, SHAPES))

    xla_ms, kernel_ms = _median_ms(jax.jit(xla), x, weights), _median_ms(jax.jit(kernel), x, packed)
    return {"xla_ms": round(xla_ms, 3), "kernel_ms": round(kernel_ms, 3),
            "xla_gbs": round(gigabytes / xla_ms * 1e3, 1), "kernel_gbs": round(gigabytes / kernel_ms * 1e3, 1)}


def attention(rows: int, length: int, rng, calls: int = 100) -> dict:
    heads, kv_heads, head_dim = 8, 4, 64
    q = jnp.asarray(rng.standard_normal((rows, heads, head_dim)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((rows, length, kv_heads, head_dim)), jnp.bfloat16) for _ in range(2))
    kv_lens = jnp.full((rows,), length, jnp.int32)
    words = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16)
    k_words, v_words = words(k.transpose(0, 2, 3, 1)), words(v.transpose(0, 2, 1, 3))

    def chained(one):
        def run(q):
            step = lambda _, acc: acc + one((q.astype(jnp.float32) + acc * 1e-30).astype(jnp.bfloat16))
            return jax.lax.fori_loop(0, calls, step, jnp.zeros(q.shape, jnp.float32))
        return jax.jit(run)

    xla = chained(lambda q: paged_xla.dense_attention(q[:, None], k, v, kv_lens, (kv_lens - 1)[:, None])[:, 0]
                  .astype(jnp.float32))
    kernel = chained(lambda q: cpu_decode.attention(q, k_words, v_words, kv_lens).astype(jnp.float32))
    return {"xla_ms": round(_median_ms(xla, q) / calls, 4), "kernel_ms": round(_median_ms(kernel, q) / calls, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,8,16", help="comma-separated row counts")
    parser.add_argument("--length", type=int, default=192, help="cached positions for the attention")
    args = parser.parse_args()
    if not cpu_decode.available():
        print(json.dumps({"bench": "cpu_decode", "skipped": cpu_decode.unavailable_reason()}))
        return
    rng = np.random.default_rng(0)
    result = {"bench": "cpu_decode", "load_avg_start": os.getloadavg()[0]}
    for rows in (int(r) for r in args.rows.split(",")):
        result[f"matmul_rows{rows}"] = matmuls(rows, rng)
        result[f"attention_rows{rows}"] = attention(rows, args.length, rng)
    result["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
