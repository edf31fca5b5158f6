"""Merge methods on one tensor: whole-tensor statistics, then an elementwise combine.

`merge_tensor(method, models, base, p, seed)` takes N arrays of one shape S (any float dtype), the base
(shape S, or None where the method has no base) and resolved `TensorParams`, and returns float32 of
shape S; `merge_pieces` yields the same values a cache-sized piece at a time, for writing straight to a
file. Every method works on task vectors tau_i = theta_i - base (tau_i = theta_i without a base).

Scope of "tensor": whole-tensor statistics (TIES' magnitude threshold, DARE's L1 rescale, SLERP's and
Model Stock's angles) are taken over the array given. `alignment.merge.streaming` passes each layer
slice of a stacked [num_layers, ...] parameter separately, so for stacked parameters they are per
layer, as in mergekit, whose tensors are per layer (TIES keeps the top `density` of each layer's task
vector, not of the whole stack).

One task-vector combine covers linear, task arithmetic, TIES and DARE:

    sparsify:  none | magnitude (TIES: keep the round(density * n) largest |tau|, ties at the threshold kept)
                    | random (DARE: keep each entry with probability density; model i's draw for entry j is
                      a hash of (its key, j), see `alignment.merge.kernels`)
    rescale:   after DARE, 'inverse' multiplies by 1/density (unbiased, the DARE paper) or 'l1' restores
               each tau's L1 norm (mergekit's behaviour)
    consensus: none     -> delta = sum_i w_i tau_i  (/ sum_i w_i when normalize: default for linear only)
               election -> TIES: s = sign(sum_i w_i tau_i) ('sum') or sign(sum_i sign(tau_i)) ('count');
                           delta = sum_{i in A} w_i tau_i / sum_{i in A} w_i, A = {i: sign(tau_i) = s != 0}
                           (the disjoint mean, always normalised by the agreeing weights; 0 where A is empty)
    result:    base + lam * delta; with no base (linear) the result is lam * delta.

On the host every pass is a compiled loop of `alignment.merge.kernels` (TIES' threshold exactly, by a
histogram pass then a pass over one histogram bucket; dot products and norms in float64 across blocks).
`combine` is the same arithmetic for any array module, so `alignment.merge.sharded` runs it jitted on
sharded jax arrays.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import operator
from typing import Any, Iterator, Sequence

import numpy as np

from alignment.merge import kernels

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


# ----------------------------------------------------------------------------- statistics


def flat_float32(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
    """C-order float32 1-D views (copies only where an input is not float32, not contiguous or not aligned)."""
    return tuple(np.require(a, np.float32, ["C", "A"]).reshape(-1) for a in arrays)


NO_BASE = flat_float32([np.empty(0, np.float32)])[0]  # the base of methods without one


class NonFiniteInput(ValueError):
    """Input `index` of a merge (model i, or N for the base) holds NaN or Inf, first at `position` (an index of S)."""

    def __init__(self, index: int, position: tuple[int, ...]):
        super().__init__(f"input {index} contains NaN or Inf (first at index {position})")
        self.index, self.position = index, position


def check_finite(arrays: Sequence[np.ndarray]) -> None:
    """Raise NonFiniteInput for the first of `arrays` (models, then the base) holding NaN or Inf."""
    for index, array in enumerate(arrays):
        # A sum is one cheap pass and is non-finite whenever an entry is; only then is the exact test paid for.
        if np.isfinite(array.sum(dtype=np.float32)):
            continue
        bad = ~np.isfinite(array)
        if bad.any():
            raise NonFiniteInput(index, tuple(int(i) for i in np.argwhere(bad)[0]))


def magnitude_thresholds(models: Sequence[np.ndarray], base: np.ndarray, k: int) -> tuple[float, ...]:
    """Per model, the k-th largest |tau| (tau = model - base, or the model for an empty base), exactly.

    A histogram of the top 16 bits finds the bucket holding the k-th largest; only that bucket's values
    are gathered and partitioned: two passes over the inputs, for all models at once.
    """
    counts = np.zeros((len(models), kernels.BUCKETS), np.int64)
    kernels.magnitude_histograms(models, base, counts)
    at_least = np.cumsum(counts[:, ::-1], axis=1)  # [i, j]: count in buckets >= BUCKETS - 1 - j
    top = np.array([np.searchsorted(row, k) for row in at_least])
    buckets = kernels.BUCKETS - 1 - top
    ranks = [k - (int(at_least[i, j - 1]) if j else 0) for i, j in enumerate(top)]  # from the top of the bucket
    offsets = np.concatenate([[0], np.cumsum(counts[np.arange(len(models)), buckets])])
    values = np.empty(int(offsets[-1]), np.float32)
    kernels.bucket_magnitudes(models, base, buckets, offsets, values)
    thresholds = []
    for i, rank in enumerate(ranks):
        bucket = values[offsets[i]:offsets[i + 1]]
        thresholds.append(float(np.partition(bucket, bucket.size - rank)[bucket.size - rank]))
    return tuple(thresholds)


def trim_thresholds(models: Sequence[np.ndarray], base: np.ndarray, density: float) -> tuple[float, ...]:
    """Per model, the |tau| an entry must reach to survive TIES' trim (0 keeps all, inf keeps none)."""
    size = models[0].size
    k = int(round(density * size))
    if k >= size:
        return (0.0,) * len(models)
    if k <= 0:
        return (float("inf"),) * len(models)
    return magnitude_thresholds(models, base, k)


def dare_scales(models: Sequence[np.ndarray], base: np.ndarray, p: TensorParams, keys: np.ndarray) -> tuple[float, ...]:
    """Per model, the factor kept DARE entries are multiplied by: 1/density, or L1 before / L1 after the drop."""
    if p.density >= 1.0:
        return (1.0,) * len(models)
    if p.rescale == "inverse":
        return (1.0 / p.density,) * len(models)
    if p.rescale != "l1":
        raise ValueError(f"rescale must be 'inverse' or 'l1', got {p.rescale!r}")
    scales = []
    for m, key in zip(models, keys):
        before, after = kernels.l1_norms(m, base, key[0], key[1], kernels.dare_cut(p.density))
        scales.append(float(before / after) if after > 0 else 1.0)
    return tuple(scales)


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


def statistics(method: Method, models: Sequence[np.ndarray], base: np.ndarray, p: TensorParams,
               keys: np.ndarray) -> dict[str, Any]:
    """The whole-tensor numbers `combine` needs, as keyword arguments for it.

    models: N float32 [n]; base: float32 [n] or `NO_BASE`; keys: `kernels.dare_keys`.
    """
    if method.kind == "slerp":
        return dict(coefficients=slerp_coefficients(kernels.gram(models, base), p.t))
    if method.kind == "model_stock":
        return dict(t=model_stock_t(kernels.gram(models, base)))
    stats: dict[str, Any] = {}
    if method.sparsify == "magnitude":
        stats["thresholds"] = trim_thresholds(models, base, p.density)
    elif method.sparsify == "random":
        stats["scales"] = dare_scales(models, base, p, keys)
    return stats


# ----------------------------------------------------------------------------- combine


def summed_weights(p: TensorParams) -> list[float]:
    """The weights of a plain task-vector sum with normalisation and lambda folded in (one multiply-add per model)."""
    scale = p.lam / sum(p.weights) if p.normalize else p.lam
    return [w * scale for w in p.weights]


def _weighted_sum(xp, coefficients: Sequence[Any], arrays: Sequence[Any]) -> Any:
    """sum_i c_i x_i in float32, without the extra pass a `sum()` starting from 0 costs."""
    return functools.reduce(operator.add, (xp.float32(c) * x for c, x in zip(coefficients, arrays)))


def combine(xp, method: Method, taus: Sequence[Any], base: Any, p: TensorParams, *, thresholds=None, scales=None,
            keeps=None, coefficients=None, t=None) -> Any:
    """The merged float32 values of one tensor from its task vectors, any shape S (`merge_tensor` on a mesh).

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
        delta = _weighted_sum(xp, summed_weights(p), taus)
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


def merge_pieces(name: str, models: Sequence[np.ndarray], base: np.ndarray | None, p: TensorParams,
                 seed: Sequence[int] = (), out: np.ndarray | None = None,
                 piece_elements: int = 1 << 18) -> Iterator[tuple[int, np.ndarray]]:
    """Merge one tensor of shape S with METHODS[name], yielding (first, values): float32 values of the result's
    elements [first, first + values.size) in C order. NonFiniteInput if an input holds NaN or Inf (raised
    before the piece holding it is yielded).

    Without `out`, values is one buffer of piece_elements (~1 MB) reused for every piece, valid until the
    next is asked for: written straight to a file, a merged tensor never exists whole in memory. With
    `out` (float32, S's size, flat) the result goes there, as one piece. seed: entropy of the DARE draws
    (model i's keys are `kernels.dare_keys(seed, N)[i]`).
    """
    method = METHODS[name]
    flat = flat_float32(models)
    if method.random and flat[0].size >= 1 << 32:
        raise ValueError(f"{name}: DARE's draws index a tensor by 32 bits; this one has {flat[0].size} entries")
    b = NO_BASE if base is None else flat_float32([base])[0]
    keys = kernels.dare_keys(seed, len(flat))
    with np.errstate(invalid="ignore", divide="ignore"):  # NaN/Inf inputs are reported after the combine's screen
        stats = statistics(method, flat, b, p, keys)
    n = len(flat)
    thresholds, scales = stats.get("thresholds", (0.0,) * n), stats.get("scales", (1.0,) * n)
    election, lam = 0, p.lam
    if method.kind == "slerp":
        coefficients = stats["coefficients"]
    elif method.kind == "model_stock":
        coefficients = [stats["t"] / n] * n
    elif method.consensus == "none":
        coefficients = summed_weights(p)
    else:
        coefficients, election = p.weights, 1 if p.election == "sum" else 2
    size = flat[0].size
    step = max(size, 1) if out is not None else piece_elements
    buffer = out if out is not None else np.empty(min(step, size), np.float32)
    per_model = [np.asarray(v, np.float32) for v in (coefficients, thresholds, scales)]
    cut = kernels.dare_cut(p.density) if method.random else 1 << 24
    for first in range(0, size, step):
        stop = min(size, first + step)
        values = buffer[:stop - first]
        pieces, base_piece = tuple(x[first:stop] for x in flat), b[first:stop] if b.size else b
        screen = kernels.combine(pieces, base_piece, *per_model, cut, keys, election, np.float32(lam), values,
                                 first_index=first)
        if not np.isfinite(screen):  # a NaN/Inf input, or a task vector that overflowed float32: find out which
            try:
                check_finite([*pieces, *([base_piece] if b.size else [])])
            except NonFiniteInput as e:  # e.position is in the piece: as an index of S
                position = np.unravel_index(first + e.position[0], np.shape(models[0]))
                raise NonFiniteInput(e.index, tuple(int(i) for i in position)) from None
        yield first, values


def merge_tensor(name: str, models: Sequence[np.ndarray], base: np.ndarray | None, p: TensorParams,
                 seed: Sequence[int] = ()) -> np.ndarray:
    """Merge one tensor of shape S with METHODS[name]: float32 [S] (`merge_pieces` into one array)."""
    out = np.empty(np.shape(models[0]), np.float32)
    for _ in merge_pieces(name, models, base, p, seed, out=out.reshape(-1)):
        pass
    return out
