"""Merge methods: pure functions of one tensor slice of every model (and the base).

Every function takes `models`, N arrays of one shape S (one layer slice, any layout, any float
dtype), `base` (shape S, or None where the method has no base), resolved `TensorParams` and a numpy
`Generator` (used by DARE only), and returns a float32 array of shape S. Arithmetic is float32;
reductions (norms, dot products) go through BLAS in float32. Whole-tensor statistics (TIES' magnitude
threshold, DARE's L1 rescale, Model Stock's and SLERP's angles) are taken over the slice given, so the
caller decides their scope; `alignment.merge.streaming` passes one layer at a time.

Task vectors are tau_i = theta_i - base. One function covers linear, task arithmetic, TIES and DARE:

    sparsify:  none | magnitude (TIES: keep the round(density * n) largest |tau|, ties at the threshold kept)
                    | random (DARE: keep each entry with probability density, mask_i = U_i < density with
                      U_i ~ U[0, 1) float32 drawn from `rng` in model order)
    rescale:   after DARE, 'inverse' multiplies by 1/density (unbiased, the DARE paper) or 'l1' restores
               each tau's L1 norm (mergekit's behaviour)
    consensus: none     -> delta = sum_i w_i tau_i  (/ sum_i w_i when normalize: default for linear only)
               election -> TIES: s = sign(sum_i w_i tau_i) ('sum') or sign(sum_i sign(tau_i)) ('count');
                           delta = sum_{i in A} w_i tau_i / sum_{i in A} w_i, A = {i: sign(tau_i) = s != 0}
                           (the disjoint mean, always normalised by the agreeing weights; 0 where A is empty)
    result:    base + lam * delta; with no base (linear) tau_i = theta_i and the result is lam * delta.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Sequence

import numpy as np


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


def _f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _flat(x: np.ndarray) -> np.ndarray:
    """A 1-D view in memory order (no copy for any contiguous layout, transposed views included)."""
    return x.ravel(order="K")


def trim_by_magnitude(tau: np.ndarray, density: float) -> np.ndarray:
    """tau with all but its round(density * size) largest-magnitude entries zeroed (ties at the threshold kept)."""
    k = int(round(density * tau.size))
    if k >= tau.size:
        return tau
    if k <= 0:
        return np.zeros_like(tau)
    magnitude = np.abs(tau)
    return np.where(magnitude >= _kth_largest(_flat(magnitude), k), tau, np.float32(0))


def _kth_largest(values: np.ndarray, k: int) -> np.float32:
    """The k-th largest of 1-D non-negative float32 `values`, exactly, in a few linear passes.

    Non-negative floats order like their bit patterns read as uint32, so a histogram of the top 16 bits
    finds the bucket holding the k-th largest and only that bucket is partitioned (about 3x faster than
    partitioning everything, which dominates TIES otherwise).
    """
    high = values.view(np.uint32) >> 16
    at_least = np.cumsum(np.bincount(high, minlength=1 << 16)[::-1])  # [j]: count in buckets >= 65535 - j
    j = int(np.searchsorted(at_least, k))
    in_bucket = values[high == (1 << 16) - 1 - j]
    rank = k - (int(at_least[j - 1]) if j else 0)  # rank of the answer inside its bucket, from the top
    return np.partition(in_bucket, in_bucket.size - rank)[in_bucket.size - rank]


def drop_and_rescale(tau: np.ndarray, density: float, rescale: str, rng: np.random.Generator) -> np.ndarray:
    """DARE: keep each entry with probability `density`, then rescale by 1/density or to the original L1 norm."""
    if density >= 1.0:
        return tau
    kept = np.where(rng.random(tau.shape, dtype=np.float32) < density, tau, np.float32(0))
    if rescale == "inverse":
        kept *= np.float32(1.0 / density)
    elif rescale == "l1":
        before, after = float(np.abs(tau).sum(dtype=np.float64)), float(np.abs(kept).sum(dtype=np.float64))
        if after > 0:
            kept *= np.float32(before / after)
    else:
        raise ValueError(f"rescale must be 'inverse' or 'l1', got {rescale!r}")
    return kept


def task_vector_merge(models: Sequence[np.ndarray], base: np.ndarray | None, p: TensorParams,
                      rng: np.random.Generator | None, *, sparsify: str = "none",
                      consensus: str = "none") -> np.ndarray:
    """The one parametrised task-vector merge (see the module docstring for the formula)."""
    taus = [_f32(m) - _f32(base) if base is not None else _f32(m) for m in models]
    if sparsify == "magnitude":
        taus = [trim_by_magnitude(tau, p.density) for tau in taus]
    elif sparsify == "random":
        taus = [drop_and_rescale(tau, p.density, p.rescale, rng) for tau in taus]
    weights = [np.float32(w) for w in p.weights]
    total = np.zeros(taus[0].shape, np.float32)
    for w, tau in zip(weights, taus):
        total += w * tau
    if consensus == "none":
        delta = total / np.float32(sum(p.weights)) if p.normalize else total
    else:
        # tau_i agrees with the elected sign s when tau_i * s > 0 (same sign, both non-zero); a product
        # test is one pass where comparing signs would be three.
        elected = sum(np.sign(tau) for tau in taus) if p.election == "count" else total
        numerator = np.zeros_like(total)
        denominator = np.zeros_like(total)
        for w, tau in zip(weights, taus):
            agree = (tau * elected > 0).view(np.uint8)
            numerator += (w * tau) * agree
            denominator += w * agree
        delta = np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator != 0)
    delta *= np.float32(p.lam)
    return delta if base is None else _f32(base) + delta


def _norm(x: np.ndarray) -> float:
    flat = _flat(x)
    return float(np.sqrt(np.dot(flat, flat)))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """cos(a, b), 0 when either is zero (no direction to compare)."""
    na, nb = _norm(a), _norm(b)
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.clip(np.dot(_flat(a), _flat(b)) / (na * nb), -1.0, 1.0))


def slerp(models: Sequence[np.ndarray], base: np.ndarray | None, p: TensorParams,
          rng: np.random.Generator | None, parallel_threshold: float = 0.9995) -> np.ndarray:
    """Spherical interpolation from models[0] (t=0) to models[1] (t=1) along the angle between them.

    result = sin((1-t) W)/sin W * a + sin(t W)/sin W * b with cos W = <a, b> / (|a| |b|); when
    |cos W| > parallel_threshold (nearly (anti)parallel, sin W ~ 0) it is the linear (1-t) a + t b.
    """
    a, b = _f32(models[0]), _f32(models[1])
    t = p.t
    na, nb = _norm(a), _norm(b)
    cos = float(np.dot(_flat(a), _flat(b)) / (na * nb)) if na and nb else 1.0  # a zero tensor: no angle
    if abs(cos) > parallel_threshold:
        return np.float32(1 - t) * a + np.float32(t) * b
    omega = float(np.arccos(cos))
    sin = np.sin(omega)
    return np.float32(np.sin((1 - t) * omega) / sin) * a + np.float32(np.sin(t * omega) / sin) * b


def model_stock(models: Sequence[np.ndarray], base: np.ndarray | None, p: TensorParams,
                rng: np.random.Generator | None) -> np.ndarray:
    """Model Stock: t * mean_i(theta_i) + (1 - t) * base with t = N cos / (1 + (N - 1) cos).

    cos is the mean pairwise cosine of the task vectors, clipped to [0, 1] so t stays in [0, 1]: a
    negative mean cosine means the fine-tuned models disagree, and the base is then the point kept.
    """
    b = _f32(base)
    taus = [_f32(m) - b for m in models]
    n = len(models)
    cos = float(np.mean([_cosine(x, y) for x, y in itertools.combinations(taus, 2)]))
    cos = min(max(cos, 0.0), 1.0)
    t = n * cos / (1 + (n - 1) * cos)
    mean = sum(taus) / np.float32(n)  # mean(theta_i) - base, so the result is base + t * (mean - base)
    return b + np.float32(t) * mean


MergeFn = Callable[[Sequence[np.ndarray], "np.ndarray | None", TensorParams, "np.random.Generator | None"], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Method:
    fn: MergeFn
    needs_base: bool
    min_models: int = 1
    max_models: int | None = None
    random: bool = False  # draws from the generator (DARE)
    defaults: tuple[tuple[str, object], ...] = ()  # TensorParams fields this method defaults differently


def _task_vector(**options) -> MergeFn:
    return lambda models, base, p, rng: task_vector_merge(models, base, p, rng, **options)


METHODS: dict[str, Method] = {
    "linear": Method(_task_vector(), needs_base=False),
    # The published task arithmetic sums weighted task vectors; only the plain average is normalised.
    "task_arithmetic": Method(_task_vector(), needs_base=True, defaults=(("normalize", False),)),
    "ties": Method(_task_vector(sparsify="magnitude", consensus="election"), needs_base=True),
    "dare_linear": Method(_task_vector(sparsify="random"), needs_base=True, random=True,
                          defaults=(("normalize", False),)),
    "dare_ties": Method(_task_vector(sparsify="random", consensus="election"), needs_base=True, random=True),
    "slerp": Method(slerp, needs_base=False, min_models=2, max_models=2),
    "model_stock": Method(model_stock, needs_base=True, min_models=2),
}
