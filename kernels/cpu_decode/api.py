"""The rollout engine's bfloat16 decode step on x86 CPUs: two XLA FFI custom calls (`decode.cc`).

`matmul`: XLA:CPU's bfloat16 matmuls of a few rows read the weights at ~20 GB/s on a 2-core AVX512-BF16 machine
(benchmarks/RESULTS.md, "Decode"), where a float32 matrix-vector product streams ~50: a decode step, which
reads every weight for a handful of rows, is bound by that. This kernel reads weights packed for it (`pack`)
once per call at close to the memory's rate; the engine's own copy of the weights is packed, everything else
keeps the [K, N] layout. `attention`: one query per row over the engine's dense per-row copies of the cache,
where XLA:CPU's batched matmuls spend a step's time on thousands of tiny matrices. Forward only, CPU only.

The C++ source is compiled on first use with the C++ compiler and the XLA FFI headers jax ships (no build step
at install, where jax may not be importable), into ~/.cache/alignment/kernels (ALIGNMENT_KERNEL_CACHE); a machine
without AVX512-BF16 or without a compiler gets `available() == False` and the reason, and callers keep XLA's
matmul.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp

BLOCK = 64  # columns per packed block (decode.cc's kBlock)
MAX_ROWS = 64  # past this many rows the matmul is compute-bound, where XLA's tiled matmul is the better one
_MATMUL, _ATTENTION = "alignment_bf16_matmul", "alignment_decode_attention"
_SOURCE = pathlib.Path(__file__).with_name("decode.cc")
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mavx512bf16", "-fopenmp-simd", "-w")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def _build() -> pathlib.Path:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if not compiler:
        raise RuntimeError("no C++ compiler (g++ or clang++; or set CXX)")
    include = jax.ffi.include_dir()
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join((compiler, include, jax.__version__, *_FLAGS)).encode())
    cache = pathlib.Path(os.environ.get("ALIGNMENT_KERNEL_CACHE", pathlib.Path.home() / ".cache/alignment/kernels"))
    path = cache / f"cpu_decode-{key.hexdigest()[:16]}.so"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place, so concurrent first uses (test workers) never load half a file.
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        out = pathlib.Path(tmp) / path.name
        result = subprocess.run([compiler, *_FLAGS, f"-I{include}", str(_SOURCE), "-o", str(out)],
                                capture_output=True, text=True, timeout=300)
        if result.returncode:
            raise RuntimeError(f"{compiler} failed on {_SOURCE.name}: {result.stderr.strip()[-2000:]}")
        os.replace(out, path)
    return path


@functools.cache
def _load() -> str:
    """'' once the custom call is registered, else why it cannot be."""
    if jax.default_backend() != "cpu":
        return f"the backend is {jax.default_backend()}, not cpu"
    if "avx512_bf16" not in _cpu_flags():
        return "this CPU has no AVX512-BF16"
    try:
        library = ctypes.cdll.LoadLibrary(str(_build()))
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        return f"building {_SOURCE.name} failed: {e}"
    jax.ffi.register_ffi_target(_MATMUL, jax.ffi.pycapsule(library.AlignmentBf16Matmul), platform="cpu")
    jax.ffi.register_ffi_target(_ATTENTION, jax.ffi.pycapsule(library.AlignmentDecodeAttention), platform="cpu")
    return ""


def _require(name: str) -> None:
    if reason := _load():
        raise RuntimeError(f"cpu_decode.{name} cannot run: {reason}")


def unavailable_reason() -> str:
    """'' when `matmul` and `attention` run here, else why not (backend, CPU features, compiler)."""
    return _load()


def available() -> bool:
    return not _load()


def pack(w: jax.Array) -> jax.Array:
    """w [K, N] -> bf16 [ceil(N / 64), ceil(K / 2), 64, 2]: column blocks, each a run of k pairs (zero padded)."""
    k, n = w.shape
    w = jnp.pad(w.astype(jnp.bfloat16), ((0, k % 2), (0, -n % BLOCK)))
    return w.reshape(w.shape[0] // 2, 2, -1, BLOCK).transpose(2, 0, 3, 1)


def unpack(packed: jax.Array, n: int) -> jax.Array:
    """`pack`'s inverse: [K', N] with K' = K rounded up to even (the padded row is zero)."""
    blocks, pairs = packed.shape[:2]
    return packed.transpose(1, 3, 0, 2).reshape(2 * pairs, blocks * BLOCK)[:, :n]


def matmul(x: jax.Array, packed: jax.Array, n: int) -> jax.Array:
    """x [M, K] @ the packed [K, N] matrix -> float32 [M, N] (bfloat16 inputs, float32 sums). Needs
    `available()`; no gradient."""
    _require("matmul")
    m, k = x.shape
    x = jnp.pad(x.astype(jnp.bfloat16), ((0, 0), (0, k % 2)))
    out = jax.ffi.ffi_call(_MATMUL, jax.ShapeDtypeStruct((m, packed.shape[0] * BLOCK), jnp.float32))(x, packed)
    return out if out.shape[1] == n else out[:, :n]


def attention(q: jax.Array, k_words: jax.Array, v_words: jax.Array, kv_lens: jax.Array) -> jax.Array:
    """q [rows, heads, head_dim] bf16, one query per row, over the first kv_lens [rows] positions of dense views
    K [rows, kv_heads, head_dim, L] and V [rows, kv_heads, L, head_dim] of bf16 values held as raw uint16 words
    -> [rows, heads, head_dim] bf16: `paged_attention.xla.dense_attention`'s numbers (float32 scores and softmax,
    bf16 probabilities, float32 sums). Needs `available()`; no gradient."""
    _require("attention")
    out = jax.ShapeDtypeStruct(q.shape, jnp.bfloat16)
    return jax.ffi.ffi_call(_ATTENTION, out)(q.astype(jnp.bfloat16), k_words, v_words, kv_lens.astype(jnp.int32))
