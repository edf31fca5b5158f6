"""Kernel benchmarks; prints one JSON object per measurement.

  memory   compiled peak temporary bytes (`memory_analysis().temp_size_in_bytes`) of forward+backward,
           fused log-prob loss vs the naive logits path (default N=8192, D=2048, V=128256, bf16)
  time     median wall time of forward+backward on this backend: fused vs naive log-prob loss, and
           flash vs dense attention; on a GPU / TPU the Pallas (and cuDNN) versions are timed too

python -m benchmarks.bench_kernels memory [--dtype float32]
python -m benchmarks.bench_kernels time [--repeats 5]
"""
from __future__ import annotations

import argparse
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from alignment_kernels.attention import api as attention_api
from alignment_kernels.attention import reference as attention_reference
from alignment_kernels.logprob_kl import api as logprob_api
from alignment_kernels.logprob_kl import reference as logprob_reference
from benchmarks.common import timed


def logprob_grad(fn):
    """jit(grad) of a token-mean NLL through `fn`, w.r.t. hidden and unembedding."""
    loss = lambda h, w, t: -jnp.mean(fn(h, w, t, temperature=1.0).logp)
    return jax.jit(jax.grad(loss, (0, 1)))


def memory(n, d, vocab, dtype):
    args = (jax.ShapeDtypeStruct((n, d), dtype), jax.ShapeDtypeStruct((d, vocab), dtype),
            jax.ShapeDtypeStruct((n,), jnp.int32))
    results = {}
    for name, fn in (("naive", logprob_reference.logprob_kl),
                     ("fused_xla", functools.partial(logprob_api.logprob_kl, impl="xla"))):
        analysis = logprob_grad(fn).lower(*args).compile().memory_analysis()
        results[name] = analysis.temp_size_in_bytes
        print(json.dumps(dict(bench="logprob_memory", impl=name, n=n, d=d, vocab=vocab, dtype=jnp.dtype(dtype).name,
                              temp_bytes=analysis.temp_size_in_bytes, temp_gib=analysis.temp_size_in_bytes / 2**30,
                              output_bytes=analysis.output_size_in_bytes)))
    print(json.dumps(dict(bench="logprob_memory", ratio_naive_over_fused=results["naive"] / results["fused_xla"])))




def timing(repeats):
    backend = jax.default_backend()
    on_accelerator = backend in ("gpu", "tpu")
    rng = np.random.default_rng(0)
    # Log-prob loss: a small-model head on CPU, a Llama-3 8B head on accelerators.
    n, d, vocab = (8192, 4096, 128256) if on_accelerator else (2048, 512, 32000)
    dtype = jnp.bfloat16 if on_accelerator else jnp.float32
    h = jnp.asarray(rng.standard_normal((n, d)), dtype)
    w = jnp.asarray(rng.standard_normal((d, vocab)) * 0.02, dtype)
    t = jnp.asarray(rng.integers(0, vocab, n), jnp.int32)
    impls = {"naive": logprob_reference.logprob_kl, "fused_xla": functools.partial(logprob_api.logprob_kl, impl="xla")}
    if on_accelerator:
        impls["fused_pallas"] = functools.partial(logprob_api.logprob_kl, impl="pallas")
    for name, fn in impls.items():
        seconds = timed(logprob_grad(fn), h, w, t, repeats=repeats, warmup=1)[0]
        print(json.dumps(dict(bench="logprob_time", backend=backend, impl=name, n=n, d=d, vocab=vocab,
                              dtype=jnp.dtype(dtype).name, median_s=seconds)))

    # Attention: packed rows of 4 samples each.
    batch, seq, heads, kv_heads, head_dim = (4, 4096, 32, 8, 128) if on_accelerator else (2, 2048, 8, 2, 64)
    q, k, v = (jnp.asarray(rng.standard_normal((batch, seq, nh, head_dim)), dtype) for nh in (heads, kv_heads, kv_heads))
    seg = jnp.asarray(np.repeat(np.arange(1, 5), seq // 4)[None].repeat(batch, 0), jnp.int32)
    pos = jnp.asarray(np.tile(np.arange(seq // 4), 4)[None].repeat(batch, 0), jnp.int32)
    attn_impls = {"dense": attention_reference.attention, "flash_xla": attention_api.IMPLEMENTATIONS["xla"]}
    if on_accelerator:
        attn_impls["pallas"] = attention_api.get_impl("pallas")[1]
        if backend == "gpu":
            attn_impls["cudnn"] = attention_api.cudnn
    for name, fn in attn_impls.items():
        loss = lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v, seg, seg, pos, pos).astype(jnp.float32))
        seconds = timed(jax.jit(jax.grad(loss, (0, 1, 2))), q, k, v, repeats=repeats, warmup=1)[0]
        print(json.dumps(dict(bench="attention_time", backend=backend, impl=name, batch=batch, seq=seq, heads=heads,
                              kv_heads=kv_heads, head_dim=head_dim, dtype=jnp.dtype(dtype).name, median_s=seconds)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("memory", "time"))
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", default="bfloat16", help="hidden and unembedding dtype for `memory`")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(dict(device=str(jax.devices()[0]), load_average=os.getloadavg())))
    if args.what == "memory":
        memory(args.n, args.d, args.vocab, jnp.dtype(args.dtype))
    else:
        timing(args.repeats)


if __name__ == "__main__":
    main()
