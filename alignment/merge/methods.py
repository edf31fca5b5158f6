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

One task-vector combine covers linear, task arithmetic, TIES and DARE (mergekit's formulas, on the same numbers):

    sparsify:  none | magnitude (TIES: keep the k = max(1, int(density * n)) largest |tau|; entries tied with
                      the k-th are all kept, where mergekit keeps an arbitrary k of them)
                    | random (DARE: keep each entry with probability density; model i's draw for entry j is
                      a hash of (its key, j), see `alignment.merge.kernels`)
               density is per model (`densities`, else `density` for all); density 1 keeps everything.
    rescale:   of each sparsified tau (density < 1): 'none'; 'inverse' multiplies by 1/density (unbiased, the
               DARE paper); 'l1' restores the L1 norm, sum|tau| / sum|kept| (mergekit's `rescale: true`; no
               rescale where either sum is below 1e-7)
    consensus: none     -> delta = sum_i w_i tau_i  (/ sum_i w_i when normalize, by 1 where |sum_i w_i| < 1e-8)
               election -> TIES: the elected sign is + where S >= 0, else -, with S = sum_i w_i tau_i ('sum') or
                           sum_i sign(w_i tau_i) ('count'); A = {i: sign(w_i tau_i) = elected sign};
                           delta = sum_{i in A} w_i tau_i, divided by sum_{i in A} w_i when normalize (by 1 where
                           that is 0): with normalize the disjoint mean of the paper
    result:    base + lam * delta; with no base (linear) the result is lam * delta.

SLERP and Model Stock follow mergekit too: a tensor whose norm is at most 1e-8 counts as norm 1 in SLERP's
angle (so a zero tensor is at 90 degrees, not parallel), and Model Stock's pairwise cosines divide by
max(|a| |b|, 1e-6); Model Stock's mean cosine is not clipped unless `clamp_cosine` (see `model_stock_t`).

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

# The thresholds below are mergekit's, so that the same inputs give the same tensors.
SLERP_PARALLEL = 0.9995  # |cos| above this is treated as (anti)parallel: SLERP becomes linear
SLERP_ZERO_NORM = 1e-8  # SLERP: a tensor norm at most this counts as 1
MODEL_STOCK_MIN_NORM_PRODUCT = 1e-6  # Model Stock: the cosine's denominator |a| |b| is at least this
MODEL_STOCK_SINGULAR = 1e-6  # Model Stock: |1 + (N - 1) cos| below this has no finite t; t = 0 (the base)
L1_RESCALE_EPS = 1e-7  # 'l1' rescale: no rescale when the L1 norm before or after the drop is below this
NORMALIZE_EPS = 1e-8  # non-TIES normalisation: a weight sum within this of 0 divides by 1


@dataclasses.dataclass(frozen=True)
class TensorParams:
    """The numbers one tensor slice is merged with (see `alignment.merge.params` for how they are resolved)."""

    weights: tuple[float, ...]  # one per model
    density: float = 1.0  # fraction of task-vector entries kept by TIES / DARE
    densities: tuple[float, ...] = ()  # one per model (mergekit's per-model density); () = density for every model
    lam: float = 1.0  # scale of the combined task vector
    t: float = 0.5  # SLERP position: 0 = first model, 1 = second
    normalize: bool = True  # linear / task arithmetic / DARE-linear / TIES: divide by the (agreeing) weights' sum
    rescale: str = "none"  # of a sparsified task vector: 'none', 'inverse' (1/density) or 'l1' (restore its L1 norm)
    election: str = "sum"  # TIES sign election: 'sum' (weighted sum of values) or 'count' (majority of signs)
    clamp_cosine: bool = False  # Model Stock: clip the mean cosine to [0, 1] (mergekit does not)

    def model_densities(self, num_models: int) -> tuple[float, ...]:
        return self.densities or (self.density,) * num_models


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


# Defaults as mergekit's: the published task arithmetic and DARE sum weighted task vectors (only the plain average
# and TIES' disjoint mean are normalised), and DARE restores each task vector's L1 norm.
METHODS: dict[str, Method] = {
    "linear": Method("task_vector", needs_base=False),
    "task_arithmetic": Method("task_vector", needs_base=True, defaults=(("normalize", False),)),
    "ties": Method("task_vector", needs_base=True, sparsify="magnitude", consensus="election"),
    "dare_linear": Method("task_vector", needs_base=True, sparsify="random",
                          defaults=(("normalize", False), ("rescale", "l1"))),
    "dare_ties": Method("task_vector", needs_base=True, sparsify="random", consensus="election",
                        defaults=(("normalize", False), ("rescale", "l1"))),
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


def magnitude_thresholds(models: Sequence[np.ndarray], base: np.ndarray, ks: Sequence[int]) -> tuple[float, ...]:
    """Per model i, the ks[i]-th largest |tau| (tau = model - base, or the model for an empty base), exactly.

    A histogram of the top 16 bits finds the bucket holding the k-th largest; only that bucket's values
    are gathered and partitioned: two passes over the inputs, for all models at once.
    """
    counts = np.zeros((len(models), kernels.BUCKETS), np.int64)
    kernels.magnitude_histograms(models, base, counts)
    at_least = np.cumsum(counts[:, ::-1], axis=1)  # [i, j]: count in buckets >= BUCKETS - 1 - j
    top = np.array([np.searchsorted(row, k) for row, k in zip(at_least, ks)])
    buckets = kernels.BUCKETS - 1 - top
    ranks = [k - (int(at_least[i, j - 1]) if j else 0) for i, (j, k) in enumerate(zip(top, ks))]  # from the top
    offsets = np.concatenate([[0], np.cumsum(counts[np.arange(len(models)), buckets])])
    values = np.empty(int(offsets[-1]), np.float32)
    kernels.bucket_magnitudes(models, base, buckets, offsets, values)
    thresholds = []
    for i, rank in enumerate(ranks):
        bucket = values[offsets[i]:offsets[i + 1]]
        thresholds.append(float(np.partition(bucket, bucket.size - rank)[bucket.size - rank]))
    return tuple(thresholds)


def trim_thresholds(models: Sequence[np.ndarray], base: np.ndarray, densities: Sequence[float]) -> tuple[float, ...]:
    """Per model, the |tau| an entry must reach to survive TIES' trim to max(1, int(density * n)) entries, as
    mergekit counts them (0 keeps all)."""
    size = models[0].size
    ks = [max(1, int(d * size)) for d in densities]
    trimmed = [i for i, (d, k) in enumerate(zip(densities, ks)) if d < 1.0 and k < size]
    found = magnitude_thresholds([models[i] for i in trimmed], base, [ks[i] for i in trimmed]) if trimmed else ()
    thresholds = [0.0] * len(models)
    for i, threshold in zip(trimmed, found):
        thresholds[i] = threshold
    return tuple(thresholds)


def rescale_factors(models: Sequence[np.ndarray], base: np.ndarray, rescale: str, densities: Sequence[float],
                    thresholds: Sequence[float], cuts: Sequence[int], keys: np.ndarray) -> tuple[float, ...]:
    """Per model, the factor its kept entries are multiplied by: 1, 1/density, or L1 before / L1 after the drop
    (one more pass over the inputs)."""
    if rescale not in ("none", "inverse", "l1"):
        raise ValueError(f"rescale must be 'none', 'inverse' or 'l1', got {rescale!r}")
    if rescale == "none":
        return (1.0,) * len(models)
    if rescale == "inverse":
        return tuple(1.0 / d if d < 1.0 else 1.0 for d in densities)
    sums = kernels.l1_norms(models, base, thresholds, keys, cuts)
    return tuple(before / after if d < 1.0 and before >= L1_RESCALE_EPS and after >= L1_RESCALE_EPS else 1.0
                 for d, (before, after) in zip(densities, sums))


def slerp_coefficients(gram: np.ndarray, t: float) -> tuple[float, float]:
    """(c_a, c_b) with result = c_a a + c_b b: sin((1-t) W)/sin W and sin(t W)/sin W, cos W = <a, b>/(|a| |b|).

    A norm of at most SLERP_ZERO_NORM counts as 1 (a zero tensor is then at 90 degrees to the other).
    When |cos W| > SLERP_PARALLEL (nearly (anti)parallel, sin W ~ 0) it is the linear (1-t, t).
    """
    na, nb = (float(np.sqrt(g)) for g in np.diag(gram))
    na, nb = (norm if norm > SLERP_ZERO_NORM else 1.0 for norm in (na, nb))
    cos = float(np.clip(gram[0, 1] / (na * nb), -1.0, 1.0))
    if abs(cos) > SLERP_PARALLEL:
        return 1.0 - t, t
    omega = float(np.arccos(cos))
    return float(np.sin((1 - t) * omega) / np.sin(omega)), float(np.sin(t * omega) / np.sin(omega))


def model_stock_t(gram: np.ndarray, clamp_cosine: bool = False) -> float:
    """Model Stock's t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the task vectors.

    As mergekit: each cosine is <a, b> / max(|a| |b|, 1e-6) (a zero task vector has cosine 0), clipped to
    [-1, 1]; a negative mean extrapolates away from the fine-tuned models' mean (t < 0), and where the
    denominator is within 1e-6 of 0 (no finite t) t is 0: the base. With clamp_cosine the mean is clipped to
    [0, 1], so t stays in [0, 1] and models that disagree give the base.
    """
    n = gram.shape[0]
    norms = np.sqrt(np.diag(gram))
    cosines = [np.clip(gram[i, j] / max(norms[i] * norms[j], MODEL_STOCK_MIN_NORM_PRODUCT), -1.0, 1.0)
               for i, j in itertools.combinations(range(n), 2)]
    cos = float(np.mean(cosines))
    if clamp_cosine:
        cos = min(max(cos, 0.0), 1.0)
    denominator = 1 + (n - 1) * cos
    return 0.0 if abs(denominator) < MODEL_STOCK_SINGULAR else n * cos / denominator


def statistics(method: Method, models: Sequence[np.ndarray], base: np.ndarray, p: TensorParams,
               keys: np.ndarray) -> dict[str, Any]:
    """The whole-tensor numbers `combine` needs, as keyword arguments for it.

    models: N float32 [n]; base: float32 [n] or `NO_BASE`; keys: `kernels.dare_keys`. Task-vector methods
    get per-model thresholds (0 = no trim), DARE cuts (`kernels.KEEP_ALL` = no drop), rescale factors and,
    without a sign election, the coefficients of their sum (`summed_weights`).
    """
    if method.kind == "slerp":
        return dict(coefficients=slerp_coefficients(kernels.gram(models, base), p.t))
    if method.kind == "model_stock":
        return dict(t=model_stock_t(kernels.gram(models, base), p.clamp_cosine))
    densities = p.model_densities(len(models))
    thresholds = (trim_thresholds(models, base, densities) if method.sparsify == "magnitude"
                  else (0.0,) * len(models))
    cuts = tuple(kernels.dare_cut(d) if method.random else kernels.KEEP_ALL for d in densities)
    scales = (rescale_factors(models, base, p.rescale, densities, thresholds, cuts, keys)
              if method.sparsify != "none" else (1.0,) * len(models))
    stats = dict(thresholds=thresholds, cuts=cuts, scales=scales)
    if method.consensus == "none":
        stats["coefficients"] = tuple(summed_weights(p))
    return stats


# ----------------------------------------------------------------------------- combine


def summed_weights(p: TensorParams) -> list[float]:
    """The weights of a plain task-vector sum with normalisation and lambda folded in (one multiply-add per model)."""
    total = sum(p.weights)
    scale = p.lam / total if p.normalize and abs(total) >= NORMALIZE_EPS else p.lam
    return [w * scale for w in p.weights]


def _weighted_sum(xp, coefficients: Sequence[Any], arrays: Sequence[Any]) -> Any:
    """sum_i c_i x_i in float32, without the extra pass a `sum()` starting from 0 costs."""
    return functools.reduce(operator.add, (xp.float32(c) * x for c, x in zip(coefficients, arrays)))


def combine(xp, method: Method, taus: Sequence[Any], base: Any, p: TensorParams, *, thresholds=None, scales=None,
            keeps=None, coefficients=None, t=None) -> Any:
    """The merged float32 values of one tensor from its task vectors, any shape S (`merge_tensor` on a mesh).

    xp: numpy or jax.numpy. taus: N float32 arrays [S]; base: float32 [S] or None. The keyword
    arguments are `statistics`' output but DARE's cuts (floats, or traced scalars under jit); keeps: N bool
    masks [S] of DARE's draws (True = kept).
    """
    f32 = xp.float32
    if method.kind == "slerp":
        return _weighted_sum(xp, coefficients, taus)
    if method.kind == "model_stock":
        return base + _weighted_sum(xp, [t / len(taus)] * len(taus), taus)
    if method.sparsify != "none":
        kept = [xp.abs(tau) >= f32(c) for tau, c in zip(taus, thresholds)]
        if keeps is not None:
            kept = [k & drawn for k, drawn in zip(kept, keeps)]
        taus = [xp.where(k, tau * f32(s), f32(0)) for tau, k, s in zip(taus, kept, scales)]
    if method.consensus == "none":
        delta = _weighted_sum(xp, coefficients, taus)
        return delta if base is None else base + delta
    weighted = [f32(w) * tau for w, tau in zip(p.weights, taus)]
    elected = sum(weighted) if p.election == "sum" else sum(xp.sign(x) for x in weighted)
    positive = elected >= 0
    agree = [xp.where(positive, x > 0, x < 0) for x in weighted]
    numerator = sum(xp.where(a, x, f32(0)) for x, a in zip(weighted, agree))
    if p.normalize:
        denominator = sum(xp.where(a, f32(w), f32(0)) for w, a in zip(p.weights, agree))
        numerator = numerator / xp.where(denominator != 0, denominator, f32(1))
    delta = f32(p.lam) * numerator
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
    # SLERP's and a plain sum's coefficients come from the statistics; TIES' are the weights
    coefficients = [stats["t"] / n] * n if method.kind == "model_stock" else stats.get("coefficients", p.weights)
    election = 0 if method.consensus == "none" else 1 if p.election == "sum" else 2
    size = flat[0].size
    step = max(size, 1) if out is not None else piece_elements
    buffer = out if out is not None else np.empty(min(step, size), np.float32)
    per_model = [np.asarray(stats.get(k, default), np.float32)
                 for k, default in (("thresholds", (0.0,) * n), ("scales", (1.0,) * n))]
    cuts = np.asarray(stats.get("cuts", (kernels.KEEP_ALL,) * n), np.uint32)
    for first in range(0, size, step):
        stop = min(size, first + step)
        values = buffer[:stop - first]
        pieces, base_piece = tuple(x[first:stop] for x in flat), b[first:stop] if b.size else b
        screen = kernels.combine(pieces, base_piece, coefficients, *per_model, cuts, keys, election, p.normalize,
                                 np.float32(p.lam), values, first_index=first)
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
