"""Merge methods on one tensor: whole-tensor statistics taken in passes over slabs, then an elementwise combine.

`merge_tensor(method, models, base, p, seed)` takes N arrays of one shape S (any float dtype), the base
(shape S, or None where the method has no base) and resolved `TensorParams`, and returns float32 of
shape S. Every method works on task vectors tau_i = theta_i - base (tau_i = theta_i without a base).

Scope of "tensor": whole-tensor statistics (TIES' magnitude threshold, DARE's L1 rescale, SLERP's and
Model Stock's angles) are taken over the array given. `alignment.merge.streaming` passes each layer
slice of a stacked [num_layers, ...] parameter separately, so for stacked parameters they are per
layer, as in mergekit, whose tensors are per layer (TIES keeps the top `density` of each layer's task
vector, not of the whole stack).

One task-vector combine covers linear, task arithmetic, TIES and DARE:

    sparsify:  none | magnitude (TIES: keep the round(density * n) largest |tau|, ties at the threshold kept)
                    | random (DARE: keep each entry with probability density, mask_i = U_i < density with
                      U_i ~ U[0, 1) float32 drawn in C order from model i's own generator,
                      numpy default_rng([*seed, i]))
    rescale:   after DARE, 'inverse' multiplies by 1/density (unbiased, the DARE paper) or 'l1' restores
               each tau's L1 norm (mergekit's behaviour)
    consensus: none     -> delta = sum_i w_i tau_i  (/ sum_i w_i when normalize: default for linear only)
               election -> TIES: s = sign(sum_i w_i tau_i) ('sum') or sign(sum_i sign(tau_i)) ('count');
                           delta = sum_{i in A} w_i tau_i / sum_{i in A} w_i, A = {i: sign(tau_i) = s != 0}
                           (the disjoint mean, always normalised by the agreeing weights; 0 where A is empty)
    result:    base + lam * delta; with no base (linear) the result is lam * delta.

Chunking: a tensor of more than `max_chunk_elements` is processed as slabs of its C-order flattening,
so temporaries are bounded by the slab, not the tensor. Statistics accumulate over slabs (TIES'
threshold exactly, by a histogram pass then a pass over one histogram bucket; sums and dot products in
float64), then each slab is combined into the output. Chunked results equal unchunked ones exactly for
linear, task arithmetic, TIES and DARE with 'inverse' (elementwise given exact statistics), and to
float32 rounding of the reductions for DARE 'l1', SLERP and Model Stock. `combine` is written for any
array module, so `alignment.merge.sharded` runs the same arithmetic jitted on sharded jax arrays.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import operator
from typing import Any, Iterator, Sequence

import numpy as np

# 256 KB per float32 temporary: a slab's handful of temporaries stays in cache between the elementwise passes
# (1 << 22 measured 1.4-2x slower on every method, bound by memory traffic).
DEFAULT_MAX_CHUNK_ELEMENTS = 1 << 16
SLERP_PARALLEL = 0.9995  # |cos| above this is treated as (anti)parallel: SLERP becomes linear


@dataclasses.dataclass(frozen=True)
class TensorParams:
    """The numbers one tensor slice is merged with (see `alignment.merge.params` for how they are resolved)."""

    weights: tuple[float, ...]  # one per model
    density: float = 1.0  # fraction of task-vector entries kept by TIES / DARE
    lam: float = 1.0  # scale of the combined task vector
    t: float = 0.5  # SLERP position: 0 = first model, 1 = second
    normalize: bool = True  # linear / task arithmetic / DARE-linear: divide by sum(weights)
    rescale: str = "inverse"  # DARE: 'inverse' (1/density) or 'l1' (restore each task vector's L1 norm)
    election: str = "sum"  # TIES sign election: 'sum' (weighted sum of values) or 'count' (majority of signs)


@dataclasses.dataclass(frozen=True)
class Method:
    kind: str  # 'task_vector' | 'slerp' | 'model_stock': which statistics and combine
    needs_base: bool
    min_models: int = 1
    max_models: int | None = None
    sparsify: str = "none"  # task_vector: none | magnitude (TIES) | random (DARE)
    consensus: str = "none"  # task_vector: none | election (TIES sign election + disjoint mean)
    defaults: tuple[tuple[str, object], ...] = ()  # TensorParams fields this method defaults differently

    @property
    def random(self) -> bool:
        return self.sparsify == "random"


METHODS: dict[str, Method] = {
    "linear": Method("task_vector", needs_base=False),
    # The published task arithmetic sums weighted task vectors; only the plain average is normalised.
    "task_arithmetic": Method("task_vector", needs_base=True, defaults=(("normalize", False),)),
    "ties": Method("task_vector", needs_base=True, sparsify="magnitude", consensus="election"),
    "dare_linear": Method("task_vector", needs_base=True, sparsify="random", defaults=(("normalize", False),)),
    "dare_ties": Method("task_vector", needs_base=True, sparsify="random", consensus="election"),
    "slerp": Method("slerp", needs_base=False, min_models=2, max_models=2),
    "model_stock": Method("model_stock", needs_base=True, min_models=2),
}


# ----------------------------------------------------------------------------- slabs


@dataclasses.dataclass(frozen=True)
class Slab:
    """One piece [start, stop) of the C-order flattening of a tensor, as float32 1-D arrays."""

    start: int
    stop: int
    taus: list[np.ndarray]  # N task vectors (the models themselves without a base)
    base: np.ndarray | None


class Slabs:
    """Iterates the slabs of one tensor, as often as the statistics need; a single slab is computed once."""

    def __init__(self, models: Sequence[np.ndarray], base: np.ndarray | None, max_chunk_elements: int):
        self.flat = [np.ascontiguousarray(m).reshape(-1) for m in models]
        self.base = None if base is None else np.ascontiguousarray(base).reshape(-1)
        self.size = self.flat[0].size
        self.step = max(1, min(max_chunk_elements, self.size))
        self._single = self._slab(0, self.size) if self.step >= self.size else None

    def _slab(self, start: int, stop: int) -> Slab:
        # Views where the input is already float32: nothing downstream writes into a task vector.
        b = None if self.base is None else self.base[start:stop].astype(np.float32, copy=False)
        taus = [m[start:stop].astype(np.float32, copy=False) if b is None
                else np.subtract(m[start:stop], b, dtype=np.float32) for m in self.flat]
        return Slab(start, stop, taus, b)

    def __iter__(self) -> Iterator[Slab]:
        if self._single is not None:
            yield self._single
            return
        for start in range(0, self.size, self.step):
            yield self._slab(start, min(start + self.step, self.size))

    def uniforms(self, seed: Sequence[int]) -> Iterator[list[np.ndarray]]:
        """Per slab, model i's U[0, 1) float32 draws for that slab (the documented DARE stream)."""
        rngs = [np.random.default_rng([*seed, i]) for i in range(len(self.flat))]
        for start in range(0, self.size, self.step):
            n = min(start + self.step, self.size) - start
            yield [rng.random(n, dtype=np.float32) for rng in rngs]


# ----------------------------------------------------------------------------- statistics


def _kth_largest(slabs: Slabs, model: int, k: int) -> np.float32:
    """The k-th largest |tau_model| over all slabs, exactly, in two passes.

    Non-negative floats order like their bit patterns read as uint32, so a histogram of the top 16 bits
    finds the bucket holding the k-th largest and only that bucket's values are kept and partitioned
    (about 3x faster than partitioning everything, which dominates TIES otherwise).
    """
    counts = np.zeros(1 << 16, np.int64)
    for slab in slabs:
        counts += np.bincount(np.abs(slab.taus[model]).view(np.uint32) >> 16, minlength=1 << 16)
    at_least = np.cumsum(counts[::-1])  # [j]: count in buckets >= 65535 - j
    j = int(np.searchsorted(at_least, k))
    bucket = (1 << 16) - 1 - j
    rank = k - (int(at_least[j - 1]) if j else 0)  # rank of the answer inside its bucket, from the top
    in_bucket = []
    for slab in slabs:
        magnitude = np.abs(slab.taus[model])
        in_bucket.append(magnitude[(magnitude.view(np.uint32) >> 16) == bucket])
    values = np.concatenate(in_bucket)
    return np.partition(values, values.size - rank)[values.size - rank]


def magnitude_thresholds(slabs: Slabs, density: float) -> tuple[float, ...]:
    """Per model, the |tau| an entry must reach to survive TIES' trim (0 keeps all, inf keeps none)."""
    k = int(round(density * slabs.size))
    if k >= slabs.size:
        return (0.0,) * len(slabs.flat)
    if k <= 0:
        return (float("inf"),) * len(slabs.flat)
    return tuple(float(_kth_largest(slabs, i, k)) for i in range(len(slabs.flat)))


def dare_scales(slabs: Slabs, p: TensorParams, seed: Sequence[int]) -> tuple[float, ...]:
    """Per model, the factor kept DARE entries are multiplied by: 1/density, or L1 before / L1 after the drop."""
    n = len(slabs.flat)
    if p.density >= 1.0:
        return (1.0,) * n
    if p.rescale == "inverse":
        return (1.0 / p.density,) * n
    if p.rescale != "l1":
        raise ValueError(f"rescale must be 'inverse' or 'l1', got {p.rescale!r}")
    before, after = np.zeros(n), np.zeros(n)
    for slab, uniforms in zip(slabs, slabs.uniforms(seed)):
        for i, (tau, u) in enumerate(zip(slab.taus, uniforms)):
            magnitude = np.abs(tau)
            before[i] += magnitude.sum(dtype=np.float64)
            after[i] += magnitude.sum(dtype=np.float64, where=u < np.float32(p.density))
    return tuple(float(b / a) if a > 0 else 1.0 for b, a in zip(before, after))


def _gram(slabs: Slabs) -> np.ndarray:
    """[N, N] float64 dot products of the task vectors, float32 BLAS per slab."""
    n = len(slabs.flat)
    gram = np.zeros((n, n))
    for slab in slabs:
        for i, j in itertools.combinations_with_replacement(range(n), 2):
            gram[i, j] += float(np.dot(slab.taus[i], slab.taus[j]))
    return gram


def slerp_coefficients(gram: np.ndarray, t: float) -> tuple[float, float]:
    """(c_a, c_b) with result = c_a a + c_b b: sin((1-t) W)/sin W and sin(t W)/sin W, cos W = <a, b>/(|a| |b|).

    When |cos W| > SLERP_PARALLEL (nearly (anti)parallel, sin W ~ 0), or a tensor is zero, it is the
    linear (1-t, t).
    """
    na, nb = np.sqrt(gram[0, 0]), np.sqrt(gram[1, 1])
    cos = gram[0, 1] / (na * nb) if na and nb else 1.0
    if abs(cos) > SLERP_PARALLEL:
        return 1.0 - t, t
    omega = float(np.arccos(cos))
    return float(np.sin((1 - t) * omega) / np.sin(omega)), float(np.sin(t * omega) / np.sin(omega))


def model_stock_t(gram: np.ndarray) -> float:
    """Model Stock's t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the task vectors.

    cos is clipped to [0, 1] so t stays in [0, 1]: a negative mean cosine means the fine-tuned models
    disagree, and the base is then the point kept. A zero task vector has no direction: cosine 0.
    """
    n = gram.shape[0]
    norms = np.sqrt(np.diag(gram))
    cosines = [gram[i, j] / (norms[i] * norms[j]) if norms[i] and norms[j] else 0.0
               for i, j in itertools.combinations(range(n), 2)]
    cos = min(max(float(np.mean(np.clip(cosines, -1.0, 1.0))), 0.0), 1.0)
    return n * cos / (1 + (n - 1) * cos)


def statistics(method: Method, slabs: Slabs, p: TensorParams, seed: Sequence[int]) -> dict[str, Any]:
    """The whole-tensor numbers `combine` needs, as keyword arguments for it."""
    if method.kind == "slerp":
        return dict(coefficients=slerp_coefficients(_gram(slabs), p.t))
    if method.kind == "model_stock":
        return dict(t=model_stock_t(_gram(slabs)))
    stats: dict[str, Any] = {}
    if method.sparsify == "magnitude":
        stats["thresholds"] = magnitude_thresholds(slabs, p.density)
    elif method.sparsify == "random":
        stats["scales"] = dare_scales(slabs, p, seed)
    return stats


# ----------------------------------------------------------------------------- combine


def _weighted_sum(xp, coefficients: Sequence[Any], arrays: Sequence[Any]) -> Any:
    """sum_i c_i x_i in float32, without the extra pass a `sum()` starting from 0 costs."""
    return functools.reduce(operator.add, (xp.float32(c) * x for c, x in zip(coefficients, arrays)))


def combine(xp, method: Method, taus: Sequence[Any], base: Any, p: TensorParams, *, thresholds=None, scales=None,
            keeps=None, coefficients=None, t=None) -> Any:
    """The merged float32 values of one slab (or tensor) from its task vectors, any shape S.

    xp: numpy or jax.numpy. taus: N float32 arrays [S]; base: float32 [S] or None. The keyword
    arguments are `statistics`' output (floats, or traced scalars under jit); keeps: N bool masks [S]
    (DARE, True = kept).
    """
    f32 = xp.float32
    if method.kind == "slerp":
        return _weighted_sum(xp, coefficients, taus)
    if method.kind == "model_stock":
        return base + _weighted_sum(xp, [t / len(taus)] * len(taus), taus)
    if thresholds is not None:
        taus = [xp.where(xp.abs(tau) >= f32(c), tau, f32(0)) for tau, c in zip(taus, thresholds)]
    if keeps is not None:
        taus = [xp.where(keep, tau * f32(s), f32(0)) for tau, keep, s in zip(taus, keeps, scales)]
    if method.consensus == "none":
        # Normalisation and lambda folded into the weights: one multiply-add pass per model.
        scale = p.lam / sum(p.weights) if p.normalize else p.lam
        delta = _weighted_sum(xp, [w * scale for w in p.weights], taus)
        return delta if base is None else base + delta
    weights = [f32(w) for w in p.weights]
    # tau_i agrees with the elected sign s when tau_i * s > 0 (same sign, both non-zero): one product
    # where comparing signs would take three passes.
    elected = sum(xp.sign(tau) for tau in taus) if p.election == "count" else _weighted_sum(xp, weights, taus)
    agree = [(tau * elected > 0).astype(xp.float32) for tau in taus]
    numerator = sum(w * tau * a for w, tau, a in zip(weights, taus, agree))
    denominator = sum(w * a for w, a in zip(weights, agree))
    delta = xp.where(denominator != 0, numerator / xp.where(denominator != 0, denominator, f32(1)), f32(0))
    delta = delta * f32(p.lam)
    return delta if base is None else base + delta


def merge_tensor(name: str, models: Sequence[np.ndarray], base: np.ndarray | None, p: TensorParams,
                 seed: Sequence[int] = (), max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS) -> np.ndarray:
    """Merge one tensor of shape S with METHODS[name]: float32 [S], in slabs of at most `max_chunk_elements`.

    seed: entropy of the DARE generators (model i draws from default_rng([*seed, i])).
    """
    method = METHODS[name]
    slabs = Slabs(models, base, max_chunk_elements)
    stats = statistics(method, slabs, p, seed)
    out = np.empty(slabs.size, np.float32)
    uniforms = slabs.uniforms(seed) if method.random else itertools.repeat(None)
    for slab, u in zip(slabs, uniforms):
        keeps = None if u is None else [x < np.float32(p.density) for x in u]
        out[slab.start:slab.stop] = combine(np, method, slab.taus, slab.base, p, keeps=keeps, **stats)
    return out.reshape(np.shape(models[0]))
