"""Compiled host loops for merging: each reads its inputs once and keeps its temporaries in a cache-sized block.

A merge is memory-bound arithmetic over a handful of float32 streams. Written as NumPy expressions,
TIES alone makes ~40 passes over each tensor (57 ns per element on a 2-core EPYC); fused, it makes
three, and every method runs at a few ns per element. The loops are C (`_loops.c`, compiled when the
package is installed) called through ctypes, which releases the GIL, so `alignment.merge.streaming`'s
worker threads merge several tensors at once. (They were numba loops first: numba's import and its
first load of cached code cost ~1.2 s per process, about the time a whole merge's I/O takes.)

Every loop takes the task vectors implicitly: `models` is a tuple of N float32 C-contiguous 1-D arrays [n]
and `base` a float32 [n] array, or an empty one where the method has no base; tau_i = models[i] - base.

DARE's random drop uses a counter-based hash instead of a sequential generator, so any element's draw
is known from (key, index) alone and the tensor can be cut or threaded freely:
    u_i[j] = lowbias32(lowbias32(j ^ k_i0) ^ k_i1) >> 8     (24 bits; kept when u < int(density * 2**24))
with (k_i0, k_i1) = `dare_keys(seed, N)[i]` and j the element's C-order index in the tensor. A cut of
KEEP_ALL (2**24) keeps every entry.
`dare_bits` is the same hash for any array module (NumPy in tests, jax.numpy on a mesh).
"""
from __future__ import annotations

import ctypes
import importlib.util
from typing import Any, Sequence

import numpy as np

BUCKETS = 1 << 16  # histogram of the top 16 bits of a non-negative float32 (as _loops.c)
_UNIFORM_BITS = 24
KEEP_ALL = 1 << _UNIFORM_BITS  # a DARE cut that every draw is below: no drop
_LOOPS_VERSION = 2  # LOOPS_VERSION of _loops.c: the calling convention below


def dare_keys(seed: Sequence[int], num_models: int) -> np.ndarray:
    """[N, 2] uint32: model i's hash keys, from NumPy's SeedSequence of (*seed, i)."""
    return np.stack([np.random.SeedSequence([*seed, i]).generate_state(2, np.uint32) for i in range(num_models)])


def dare_bits(xp, keys: Any, index: Any) -> Any:
    """The 24-bit draws u[j] of one model (keys: two uint32) at uint32 indices `index`; any array module."""
    def lowbias32(x):
        x = x ^ (x >> 16)
        x = x * xp.uint32(0x7FEB352D)
        x = x ^ (x >> 15)
        x = x * xp.uint32(0x846CA68B)
        return x ^ (x >> 16)

    return lowbias32(lowbias32(index ^ xp.uint32(keys[0])) ^ xp.uint32(keys[1])) >> (32 - _UNIFORM_BITS)


def dare_cut(density: float) -> int:
    """An entry is kept when its 24-bit draw is below this."""
    return int(density * (1 << _UNIFORM_BITS))


def _library() -> ctypes.CDLL:
    spec = importlib.util.find_spec("alignment.merge._loops")
    if spec is None or spec.origin is None:
        raise ImportError("alignment/merge/_loops.c is not compiled: install the package (pip install -e .), "
                          "which builds it (a C compiler and the Python headers are needed)")
    library = ctypes.CDLL(spec.origin)
    if library.merge_loops_version() != _LOOPS_VERSION:
        raise ImportError(f"{spec.origin} was built from other sources than alignment/merge/_loops.c: rebuild it "
                          "(pip install -e .)")
    pointer, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    signatures = {  # every loop returns a status: 0, or the error `_run` raises
        "merge_combine": [pointer, i64, pointer, i64, i64, pointer, pointer, pointer, pointer, pointer, i64, i64,
                          f32, pointer, pointer],
        "merge_magnitude_histograms": [pointer, i64, pointer, i64, pointer],
        "merge_bucket_magnitudes": [pointer, i64, pointer, i64, pointer, pointer, pointer],
        "merge_gram": [pointer, i64, pointer, i64, pointer],
        "merge_l1_norms": [pointer, i64, pointer, i64, pointer, pointer, pointer, pointer],
    }
    for name, arguments in signatures.items():
        getattr(library, name).argtypes = arguments
        getattr(library, name).restype = ctypes.c_int
    return library


_LOOPS = _library()


def _address(array: np.ndarray, dtype, size: int, what: str) -> int:
    """The data pointer of an aligned C-contiguous 1-D `dtype` array of `size` elements; a loop reads exactly
    that many."""
    if (array.dtype != dtype or array.ndim != 1 or array.size != size or not array.flags.c_contiguous
            or not array.flags.aligned):
        raise ValueError(f"{what}: need an aligned C-contiguous 1-D {np.dtype(dtype).name} array of {size} "
                         f"elements, got {array.dtype} {array.shape}")
    return array.ctypes.data


def _inputs(models: Sequence[np.ndarray], base: np.ndarray) -> tuple[Any, int, int | None, int]:
    """(pointer array, N, base pointer or None, n) for the loops."""
    n = models[0].size
    addresses = [_address(m, np.float32, n, f"model {i}") for i, m in enumerate(models)]
    pointers = (ctypes.c_void_p * len(models))(*addresses)
    return pointers, len(models), _address(base, np.float32, n, "base") if base.size else None, n


def _run(status: int) -> None:
    if status == -1:
        raise MemoryError("a merge loop could not allocate its block buffers")
    if status != 0:
        raise RuntimeError("an input of the merge changed while it was being read (its file was rewritten)")


def combine(models, base, coefficients, thresholds, scales, cuts, keys, election, normalize, lam, out,
            first_index=0) -> float:
    """out[n] = the merged float32 values; one read of every input. Returns 0 when every tau was finite, else
    NaN (a screen for NaN/Inf inputs at the cost of one subtraction per element).

    Per model i: tau_i kept where |tau_i| >= thresholds[i] (0 keeps all) and its DARE draw is below cuts[i]
    (KEEP_ALL keeps all), kept entries times scales[i]; then
      election 0: out = base + sum_i coefficients[i] tau_i            (normalisation and lam already folded in)
      election 1/2: TIES' disjoint sum with weights w = coefficients, the sign elected (+ where the sum is >= 0)
                    by sum_i w_i tau_i (1) or by sum_i sign(w_i tau_i) (2); A = the i with sign(w_i tau_i) elected:
                    out = base + lam * sum_A w_i tau_i, divided by sum_A w_i (1 where 0) when normalize.
    coefficients, thresholds, scales: float32 [N]; cuts: uint32 [N]; keys: uint32 [N, 2] (`dare_keys`);
    first_index: the index of the inputs' first element in their tensor, so a piece of it draws DARE's masks as
    the whole would.
    """
    pointers, num, base_pointer, n = _inputs(models, base)
    per_model = [np.ascontiguousarray(a, np.float32) for a in (coefficients, thresholds, scales)]
    cuts, keys = np.ascontiguousarray(cuts, np.uint32), np.ascontiguousarray(keys, np.uint32)
    addresses = [_address(a, np.float32, num, name)
                 for a, name in zip(per_model, ("coefficients", "thresholds", "scales"))]
    if keys.shape != (num, 2):
        raise ValueError(f"keys: need [{num}, 2] uint32, got {keys.shape}")
    screen = ctypes.c_float()
    _run(_LOOPS.merge_combine(pointers, num, base_pointer, n, first_index, *addresses,
                              _address(cuts, np.uint32, num, "cuts"), keys.ctypes.data, election, int(normalize), lam,
                              _address(out, np.float32, n, "out"), ctypes.byref(screen)))
    return screen.value


def magnitude_histograms(models, base, counts) -> None:
    """counts[N, BUCKETS] (int64) += per model, a histogram of the top 16 bits of |tau| (non-negative floats
    order like their bits). One pass: each block of the base is read once for all models."""
    pointers, num, base_pointer, n = _inputs(models, base)
    if counts.shape != (num, BUCKETS) or counts.dtype != np.int64 or not counts.flags.c_contiguous:
        raise ValueError(f"counts: need a C-contiguous int64 [{num}, {BUCKETS}] array, got {counts.dtype} "
                         f"{counts.shape}")
    _run(_LOOPS.merge_magnitude_histograms(pointers, num, base_pointer, n, counts.ctypes.data))


def bucket_magnitudes(models, base, buckets, offsets, out) -> None:
    """Per model i, the |tau| whose top 16 bits are buckets[i], into out[offsets[i]:offsets[i + 1]] (sized
    from the histogram). One pass, as `magnitude_histograms`."""
    pointers, num, base_pointer, n = _inputs(models, base)
    buckets, offsets = np.ascontiguousarray(buckets, np.int64), np.ascontiguousarray(offsets, np.int64)
    _run(_LOOPS.merge_bucket_magnitudes(pointers, num, base_pointer, n, _address(buckets, np.int64, num, "buckets"),
                                        _address(offsets, np.int64, num + 1, "offsets"),
                                        _address(out, np.float32, int(offsets[-1]), "out")))


def gram(models, base) -> np.ndarray:
    """[N, N] float64 dot products of the task vectors (float32 within a block, float64 across blocks)."""
    pointers, num, base_pointer, n = _inputs(models, base)
    result = np.empty((num, num))
    _run(_LOOPS.merge_gram(pointers, num, base_pointer, n, result.ctypes.data))
    return result


def l1_norms(models, base, thresholds, keys, cuts) -> np.ndarray:
    """[N, 2] float64: per model, sum |tau| and sum |tau| over the entries kept (|tau| >= thresholds[i] and its DARE
    draw with keys[i] below cuts[i]). One pass, as `magnitude_histograms`."""
    pointers, num, base_pointer, n = _inputs(models, base)
    thresholds = np.ascontiguousarray(thresholds, np.float32)
    keys, cuts = np.ascontiguousarray(keys, np.uint32), np.ascontiguousarray(cuts, np.uint32)
    if keys.shape != (num, 2):
        raise ValueError(f"keys: need [{num}, 2] uint32, got {keys.shape}")
    sums = np.empty((num, 2))
    _run(_LOOPS.merge_l1_norms(pointers, num, base_pointer, n, _address(thresholds, np.float32, num, "thresholds"),
                               keys.ctypes.data, _address(cuts, np.uint32, num, "cuts"), sums.ctypes.data))
    return sums
