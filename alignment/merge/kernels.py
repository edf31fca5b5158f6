"""Compiled host loops for merging: each reads its inputs once and keeps its temporaries in a cache-sized block.

A merge is memory-bound arithmetic over a handful of float32 streams. Written as NumPy expressions,
TIES alone makes ~40 passes over each tensor (57 ns per element on a 2-core EPYC); fused here it makes
two, and every method runs at a few ns per element. The loops are numba-compiled once and cached on
disk (`cache=True`), and release the GIL (`nogil=True`), so `alignment.merge.streaming`'s worker threads
merge several tensors at once.

Every kernel takes the task vectors implicitly: `models` is a tuple of N float32 1-D arrays [n] and
`base` a float32 [n] array, or an empty one where the method has no base; tau_i = models[i] - base.
Inner loops run over a block of BLOCK elements with nothing else in them, so LLVM vectorises them;
they index slices from 0 (an index like `x[start + j]` carries numba's negative-index wraparound,
which stops vectorisation: 2-3x slower).

DARE's random drop uses a counter-based hash instead of a sequential generator, so any element's draw
is known from (key, index) alone and the tensor can be cut or threaded freely:
    u_i[j] = lowbias32(lowbias32(j ^ k_i0) ^ k_i1) >> 8     (24 bits; kept when u < density * 2**24)
with (k_i0, k_i1) = `dare_keys(seed, N)[i]` and j the element's C-order index in the tensor.
`dare_bits` is the same hash for any array module (NumPy in tests, jax.numpy on a mesh).
"""
from __future__ import annotations

from typing import Any, Sequence

import numba
import numpy as np

BLOCK = 2048  # elements per block: N + 3 float32 rows of it stay in L1/L2
BUCKETS = 1 << 16  # histogram of the top 16 bits of a non-negative float32
_UNIFORM_BITS = 24

_jit = numba.njit(nogil=True, cache=True, error_model="numpy")
# Reductions may be reordered inside a block (vectorised partial sums); blocks accumulate in float64.
_jit_reduce = numba.njit(nogil=True, cache=True, error_model="numpy", fastmath={"reassoc", "contract"})


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


@numba.njit(nogil=True, cache=True, inline="always")
def _lowbias32(x):
    # x is a uint64 holding 32 bits; products are reduced mod 2**32 by the mask.
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x


@numba.njit(nogil=True, cache=True, inline="always")
def _draw(index, k0, k1):
    """DARE's 24-bit draw for element `index` of a model with keys (k0, k1) (all uint64)."""
    return _lowbias32(_lowbias32(index ^ k0) ^ k1) >> 8


@numba.njit(nogil=True, cache=True, inline="always")
def _load_tau(x, base, dest):
    """dest[:x.size] = x - base (x itself for an empty base); x and base are one block's slices."""
    if base.size:
        for j in range(x.size):
            dest[j] = x[j] - base[j]
    else:
        for j in range(x.size):
            dest[j] = x[j]


@numba.njit(nogil=True, cache=True, inline="always")
def _load_magnitude(x, base, dest):
    """dest[:x.size] = |x - base|, as `_load_tau`."""
    _load_tau(x, base, dest)
    for j in range(x.size):
        dest[j] = abs(dest[j])


@numba.njit(nogil=True, cache=True, inline="always")
def _drop(dest, m, start, k0, k1, cut, scale):
    """DARE on a loaded block: keep entry j (scaled) when its draw is below cut, else 0."""
    zero = np.float32(0)
    for j in range(m):
        dest[j] = dest[j] * scale if _draw(np.uint64(start + j), k0, k1) < cut else zero


@_jit
def combine(models, base, coefficients, thresholds, scales, cut, keys, election, lam, out):
    """out[n] = the merged float32 values; one read of every input. Returns 0 when every tau was finite, else
    NaN (a screen for NaN/Inf inputs at the cost of one subtraction per element).

    Per model i: tau_i, trimmed to |tau_i| >= thresholds[i] (0 keeps all), DARE-dropped with scales[i]
    when cut < 2**24; then
      election 0: out = base + sum_i coefficients[i] tau_i            (lam already folded in)
      election 1/2: TIES' disjoint mean with weights coefficients, sign elected by the weighted sum (1)
                    or by the count of signs (2): out = base + lam * sum_A w_i tau_i / sum_A w_i.
    """
    n, num = out.size, len(models)
    zero = np.float32(0)
    drop = cut < (1 << 24)
    taus = np.empty((num, BLOCK), np.float32)
    acc = np.empty(BLOCK, np.float32)
    numerator = np.empty(BLOCK, np.float32)
    denominator = np.empty(BLOCK, np.float32)
    screen = np.zeros(BLOCK, np.float32)  # tau - tau is 0 for a finite tau and NaN otherwise; per lane, so it vectorises
    for start in range(0, n, BLOCK):
        m = min(BLOCK, n - start)
        b = base[start:start + m]
        for i in range(num):
            tau, x = taus[i], models[i][start:start + m]
            if base.size:  # _load_tau with the screen in the same loop (a loop of its own costs ~2 ns/element)
                for j in range(m):
                    v = x[j] - b[j]
                    tau[j] = v
                    screen[j] += v - v
            else:
                for j in range(m):
                    v = x[j]
                    tau[j] = v
                    screen[j] += v - v
            c = thresholds[i]
            if c > 0:
                for j in range(m):
                    tau[j] = tau[j] if abs(tau[j]) >= c else zero
            if drop:
                _drop(tau, m, start, np.uint64(keys[i, 0]), np.uint64(keys[i, 1]), cut, scales[i])
        acc[:m] = zero
        if election == 2:
            for i in range(num):
                tau = taus[i]
                for j in range(m):
                    acc[j] += np.float32(1) if tau[j] > 0 else (np.float32(-1) if tau[j] < 0 else zero)
        else:
            for i in range(num):
                w, tau = coefficients[i], taus[i]
                for j in range(m):
                    acc[j] += w * tau[j]
        if election != 0:
            # tau_i agrees with the elected sign when tau_i * elected > 0 (same sign, both non-zero).
            numerator[:m] = zero
            denominator[:m] = zero
            for i in range(num):
                w, tau = coefficients[i], taus[i]
                for j in range(m):
                    agree = tau[j] * acc[j] > 0
                    numerator[j] += w * tau[j] if agree else zero
                    denominator[j] += w if agree else zero
            for j in range(m):
                acc[j] = lam * (numerator[j] / denominator[j]) if denominator[j] != 0 else zero
        o = out[start:start + m]
        if base.size:
            for j in range(m):
                o[j] = b[j] + acc[j]
        else:
            o[:] = acc[:m]
    return screen.sum()


@_jit
def magnitude_histograms(models, base, counts):
    """counts[N, BUCKETS] += per model, a histogram of the top 16 bits of |tau| (non-negative floats order
    like their bits). One pass: each block of the base is read once for all models."""
    magnitude = np.empty(BLOCK, np.float32)
    bits = magnitude.view(np.uint32)
    n = models[0].size
    for start in range(0, n, BLOCK):
        m = min(BLOCK, n - start)
        for i in range(len(models)):
            _load_magnitude(models[i][start:start + m], base[start:start + m], magnitude)
            for j in range(m):
                counts[i, bits[j] >> 16] += 1


@_jit
def bucket_magnitudes(models, base, buckets, offsets, out):
    """Per model i, the |tau| whose top 16 bits are buckets[i], into out[offsets[i]:offsets[i + 1]] (sized
    from the histogram). One pass, as `magnitude_histograms`."""
    magnitude = np.empty(BLOCK, np.float32)
    bits = magnitude.view(np.uint32)
    found = offsets[:-1].copy()
    n = models[0].size
    for start in range(0, n, BLOCK):
        m = min(BLOCK, n - start)
        for i in range(len(models)):
            _load_magnitude(models[i][start:start + m], base[start:start + m], magnitude)
            bucket = buckets[i]
            for j in range(m):
                if bits[j] >> 16 == bucket:
                    out[found[i]] = magnitude[j]
                    found[i] += 1


@_jit_reduce
def gram(models, base):
    """[N, N] float64 dot products of the task vectors (float32 within a block, float64 across blocks)."""
    num, n = len(models), models[0].size
    taus = np.empty((num, BLOCK), np.float32)
    result = np.zeros((num, num))
    for start in range(0, n, BLOCK):
        m = min(BLOCK, n - start)
        for i in range(num):
            _load_tau(models[i][start:start + m], base[start:start + m], taus[i])
        for i in range(num):
            for k in range(i, num):
                a, b = taus[i], taus[k]
                dot = np.float32(0)
                for j in range(m):
                    dot += a[j] * b[j]
                result[i, k] += dot
    for i in range(num):
        for k in range(i):
            result[i, k] = result[k, i]
    return result


@_jit_reduce
def l1_norms(x, base, k0, k1, cut):
    """(sum |tau|, sum |tau| over the entries DARE keeps), float64."""
    tau = np.empty(BLOCK, np.float32)
    before, after = 0.0, 0.0
    for start in range(0, x.size, BLOCK):
        m = min(BLOCK, x.size - start)
        _load_tau(x[start:start + m], base[start:start + m], tau)
        block_before, block_after = np.float32(0), np.float32(0)
        for j in range(m):
            magnitude = abs(tau[j])
            block_before += magnitude
            block_after += magnitude if _draw(np.uint64(start + j), k0, k1) < cut else np.float32(0)
        before += block_before
        after += block_after
    return before, after
