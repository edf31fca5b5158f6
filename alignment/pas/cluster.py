"""Clustering for prompt selection: k-means in JAX (coarse, then fine within each coarse cluster) and
agglomerative clustering with an increasing sequence of distance thresholds, keeping representatives.

Distances: squared Euclidean, or with `spherical=True` the cosine distance 1 - x.c on unit rows (centroids
re-normalised after each mean), which is half the squared Euclidean distance between unit vectors.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage

from alignment.pas.embed import normalize

LINKAGES = ("single", "complete", "average", "weighted")  # the scipy methods that accept a cosine metric


class KMeans(NamedTuple):
    centroids: np.ndarray  # [k, dim] float32
    assignments: np.ndarray  # [n] int: nearest centroid of each point
    inertia: float  # sum over points of the distance to their centroid
    iterations: int  # Lloyd steps run before the centroids moved less than the tolerance


class Hierarchy(NamedTuple):
    kept: np.ndarray  # [m] int: indices of the final representatives, ascending
    counts: list[int]  # how many representatives remain after each threshold
    represented_by: np.ndarray  # [n] int: the final representative each input item was merged into


def pairwise_distances(x: jax.Array, centroids: jax.Array, spherical: bool) -> jax.Array:
    """[n, dim], [k, dim] -> [n, k] squared Euclidean (or cosine, for unit rows) distances."""
    if spherical:
        return 1.0 - x @ centroids.T
    squared = (x * x).sum(-1)[:, None] - 2.0 * x @ centroids.T + (centroids * centroids).sum(-1)[None, :]
    return jnp.maximum(squared, 0.0)  # the expanded form can dip below zero by rounding


def kmeans_plusplus(x: jax.Array, weights: jax.Array, k: int, key: jax.Array, spherical: bool = False) -> jax.Array:
    """[n, dim] points, [n] 0/1 weights -> [k, dim] initial centroids: the first drawn uniformly, each next one
    with probability proportional to its distance to the nearest centroid chosen so far (weight-0 points never)."""
    key, first_key = jax.random.split(key)
    first = x[jax.random.categorical(first_key, jnp.log(weights))]
    centroids = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(first)
    nearest = pairwise_distances(x, first[None], spherical)[:, 0]  # [n]

    def add(j, carry):
        centroids, nearest, key = carry
        key, draw_key = jax.random.split(key)
        mass = jnp.maximum(nearest, 0.0) * weights
        # All points already on a centroid (fewer distinct points than k): draw uniformly instead of log(0).
        chosen = x[jax.random.categorical(draw_key, jnp.log(jnp.where(mass.sum() > 0, mass, weights)))]
        nearest = jnp.minimum(nearest, pairwise_distances(x, chosen[None], spherical)[:, 0])
        return centroids.at[j].set(chosen), nearest, key

    centroids, _, _ = jax.lax.fori_loop(1, k, add, (centroids, nearest, key))
    return centroids


def lloyd_step(x: jax.Array, centroids: jax.Array, spherical: bool = False, weights: jax.Array | None = None):
    """One Lloyd iteration. [n, dim], [k, dim] -> (new centroids [k, dim], assignments [n] to the *given*
    centroids, inertia of the given centroids). Points of weight 0 ([n] weights, default all 1) are assigned
    but move no centroid and add no inertia.

    A cluster left empty is re-seeded deterministically: the empty clusters, in index order, take the points
    farthest from their own centroid, farthest first.
    """
    k = centroids.shape[0]
    weights = jnp.ones(x.shape[0], x.dtype) if weights is None else weights
    distances = pairwise_distances(x, centroids, spherical)  # [n, k]
    assignments = jnp.argmin(distances, axis=1)
    own = jnp.take_along_axis(distances, assignments[:, None], axis=1)[:, 0]  # [n]
    sums = jax.ops.segment_sum(x * weights[:, None], assignments, num_segments=k)  # [k, dim]
    counts = jax.ops.segment_sum(weights, assignments, num_segments=k)  # [k]
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    if spherical:
        means = normalize(means)
    empty = counts == 0
    farthest = jnp.argsort(jnp.where(weights > 0, -own, jnp.inf), stable=True)  # [n]
    reseeded = x[farthest[jnp.cumsum(empty) - 1]]  # the r-th empty cluster gets the r-th farthest point
    return jnp.where(empty[:, None], reseeded, means), assignments, (own * weights).sum()


@functools.partial(jax.jit, static_argnames=("k", "max_iters", "spherical"))
def _kmeans(x, weights, key, tol, k, max_iters, spherical):
    def moving(state):
        _, shift, step = state
        return (step < max_iters) & (shift > tol)

    def step(state):
        centroids, _, count = state
        new, _, _ = lloyd_step(x, centroids, spherical, weights)
        return new, ((new - centroids) ** 2).sum(-1).max(), count + 1

    start = (kmeans_plusplus(x, weights, k, key, spherical), jnp.array(jnp.inf, x.dtype), 0)
    centroids, _, iterations = jax.lax.while_loop(moving, step, start)
    _, assignments, inertia = lloyd_step(x, centroids, spherical, weights)
    return centroids, assignments, inertia, iterations


def kmeans(x: np.ndarray, k: int, seed: int = 0, max_iters: int = 100, tol: float = 1e-8,
           spherical: bool = False, mask: np.ndarray | None = None) -> KMeans:
    """k-means++ from `seed`, then jitted Lloyd steps until no centroid moves more than `tol` (squared
    distance) or `max_iters` steps. x: [n, dim]; with `spherical` its rows are normalised first.

    mask: [n] bool, default all: cluster only these points, keeping one compiled shape for many subsets of
    the same array (points outside the mask still get the assignment to their nearest centroid).
    """
    if x.ndim != 2:
        raise ValueError(f"kmeans: points must be [n, dim], got shape {x.shape}")
    mask = np.ones(len(x), bool) if mask is None else np.asarray(mask, bool)
    if not 1 <= k <= mask.sum():
        raise ValueError(f"kmeans: k={k} clusters needs 1 <= k <= number of points ({mask.sum()})")
    points = jnp.asarray(x, jnp.float32)
    if spherical:
        points = normalize(points)
    centroids, assignments, inertia, iterations = _kmeans(points, jnp.asarray(mask, jnp.float32),
                                                          jax.random.key(seed), tol, k=k, max_iters=max_iters,
                                                          spherical=spherical)
    return KMeans(np.asarray(centroids), np.asarray(assignments), float(inertia), int(iterations))


def coarse_fine(x: np.ndarray, num_coarse: int, num_fine: int, seed: int = 0, spherical: bool = True,
                max_iters: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """[n, dim] -> (coarse labels [n], fine labels [n]): k-means into min(num_coarse, n) clusters, then each
    coarse cluster into min(num_fine, its size) fine clusters. Fine labels are numbered across the whole set."""
    coarse = kmeans(x, min(num_coarse, len(x)), seed, max_iters, spherical=spherical).assignments
    fine = np.zeros(len(x), np.int64)
    offset = 0
    for label in np.unique(coarse):
        members = np.flatnonzero(coarse == label)
        # The whole array under a mask: one compiled k-means serves every coarse cluster.
        inner = kmeans(x, min(num_fine, len(members)), seed, max_iters, spherical=spherical,
                       mask=coarse == label)
        # Renumber densely: a re-seeded cluster may still end empty and must not leave a gap.
        _, dense = np.unique(inner.assignments[members], return_inverse=True)
        fine[members] = offset + dense
        offset += int(dense.max()) + 1
    return coarse, fine


def representatives(x: np.ndarray, labels: np.ndarray, quality: np.ndarray | None = None) -> np.ndarray:
    """One index per cluster, ascending. x: [n, dim] unit rows, labels: [n]. The representative is the member of
    highest `quality` [n] when given, else the medoid (largest summed cosine similarity to its cluster)."""
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        score = quality[members] if quality is not None else (x[members] @ x[members].T).sum(1)
        chosen.append(members[int(np.argmax(score))])
    return np.sort(np.array(chosen, dtype=np.int64))


def hierarchical_select(x: np.ndarray, thresholds: list[float], quality: np.ndarray | None = None,
                        method: str = "average") -> Hierarchy:
    """Agglomerative clustering on cosine distance, once per threshold of an increasing sequence: cut the tree
    at t1 and keep each cluster's representative, re-cluster those representatives at t2 > t1, and so on.
    x: [n, dim]; quality: [n] or None (then medoids)."""
    if method not in LINKAGES:
        raise ValueError(f"hierarchical_select: linkage {method!r} is not one of {LINKAGES}")
    if not thresholds or any(b <= a for a, b in zip(thresholds, thresholds[1:])) or thresholds[0] < 0:
        raise ValueError(f"hierarchical_select: thresholds must be a non-empty increasing sequence of "
                         f"non-negative cosine distances, got {list(thresholds)}")
    x = normalize(np.asarray(x, np.float64))
    alive = np.arange(len(x))  # indices still in play
    represented_by = np.arange(len(x))
    counts = []
    for threshold in thresholds:
        if len(alive) >= 2:
            labels = fcluster(linkage(x[alive], method=method, metric="cosine"), threshold, criterion="distance")
        else:
            labels = np.zeros(len(alive), np.int64)
        reps = representatives(x[alive], labels, None if quality is None else quality[alive])  # into alive
        rep_of_label = dict(zip(labels[reps], alive[reps]))
        new_rep = np.array([rep_of_label[label] for label in labels])  # [len(alive)]: alive item -> its rep
        position = np.full(len(x), -1)
        position[alive] = np.arange(len(alive))
        represented_by = new_rep[position[represented_by]]
        alive = alive[reps]
        counts.append(len(alive))
    return Hierarchy(alive, counts, represented_by)
