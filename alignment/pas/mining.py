"""Hard triplets from prompt templates, and triplet-loss fine-tuning of the embedder.

Two prompts share a task when their *templates* (numbers and quoted spans replaced by placeholders) are
alike, measured by the token-level longest-common-subsequence ratio 2 * LCS / (len a + len b). An embedder
that splits such prompts into different fine clusters, or lumps unlike templates into one, is corrected by
triplets (anchor, hard positive from another fine cluster with a similar template, hard negative from the
same fine cluster with a dissimilar template) and a cosine-distance triplet loss.
"""
from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alignment.pas.embed import Embedder, mean_pool, tokenize

# Double, curly and backtick quotes anywhere; single quotes only at word edges, so "don't" stays a word.
_QUOTED = re.compile(r"\"[^\"]*\"|“[^”]*”|`[^`]*`|(?<!\w)'[^']*'(?!\w)")
_NUMBER = re.compile(r"[-+]?\d+(?:[.,]\d+)*")
_TOKEN = re.compile(r"<num>|<quote>|\w+|[^\w\s]")


def template_tokens(text: str) -> list[str]:
    """A prompt's template as lower-case word / punctuation tokens, with <quote> and <num> placeholders."""
    text = _NUMBER.sub(" <num> ", _QUOTED.sub(" <quote> ", text.lower()))
    return _TOKEN.findall(text)


def _lcs_against(anchor: np.ndarray, others: np.ndarray) -> np.ndarray:
    """LCS lengths of one int sequence [la] against [m, T] int sequences right-padded with -1 -> [m].

    Row DP over the anchor's tokens, vectorised over the other sequences and their positions: with
    L[i, 0] = 0, the recurrence L[i, j] = max(L[i-1, j], L[i, j-1], L[i-1, j-1] + match) unrolls to a running
    maximum along j of max(L[i-1, j], L[i-1, j-1] + match).
    """
    previous = np.zeros((others.shape[0], others.shape[1] + 1), np.int32)
    for token in anchor:
        candidate = np.maximum(previous[:, 1:], previous[:, :-1] + (others == token))
        previous[:, 1:] = np.maximum.accumulate(candidate, axis=1)
    return previous[:, -1]


def _ids(sequences: Sequence[Sequence[str]]) -> tuple[list[np.ndarray], np.ndarray]:
    """Token sequences -> (int arrays, [m, max length] matrix padded with -1)."""
    vocab: dict[str, int] = {}
    arrays = [np.array([vocab.setdefault(t, len(vocab)) for t in seq], np.int32) for seq in sequences]
    padded = np.full((len(arrays), max([len(a) for a in arrays] + [1])), -1, np.int32)
    for row, array in enumerate(arrays):
        padded[row, :len(array)] = array
    return arrays, padded


def lcs_ratio(a: Sequence[str], b: Sequence[str]) -> float:
    """2 * LCS(a, b) / (len a + len b) of two token sequences; 1.0 for two empty ones."""
    if not a and not b:
        return 1.0
    arrays, padded = _ids([a, b])
    return 2.0 * int(_lcs_against(arrays[0], padded[1:])[0]) / (len(a) + len(b))


def template_similarity(texts: Sequence[str]) -> np.ndarray:
    """[n, n] float32 LCS ratios of the texts' templates (computed once per distinct template)."""
    templates = [tuple(template_tokens(t)) for t in texts]
    distinct = sorted(set(templates))
    index = {t: i for i, t in enumerate(distinct)}
    arrays, padded = _ids(distinct)
    lengths = np.array([len(a) for a in arrays], np.float32)
    ratios = np.ones((len(distinct), len(distinct)), np.float32)
    for row, array in enumerate(arrays):
        total = lengths[row] + lengths
        lcs = _lcs_against(array, padded).astype(np.float32)
        ratios[row] = np.where(total > 0, 2.0 * lcs / np.maximum(total, 1.0), 1.0)
    inverse = np.array([index[t] for t in templates], np.int64)
    return ratios[np.ix_(inverse, inverse)]


def mine_triplets(similarity: np.ndarray, fine: np.ndarray, positive_min: float, negative_max: float,
                  seed: int = 0) -> np.ndarray:
    """[t, 3] int (anchor, positive, negative) rows, at most one per anchor.

    similarity: [n, n] template similarity; fine: [n] fine-cluster labels. The positive is the most similar
    prompt (>= positive_min) in another fine cluster, the negative the least similar (<= negative_max) in the
    anchor's own cluster; ties are broken at random (from `seed`), afresh for each anchor so that prompts sharing
    a template do not all pick the same partner. Anchors lacking either are skipped.
    """
    rng = np.random.default_rng(seed)
    triplets = []
    for anchor in range(len(fine)):
        tiebreak = rng.random(len(fine))
        same = fine == fine[anchor]
        positives = np.flatnonzero(~same & (similarity[anchor] >= positive_min))
        same[anchor] = False
        negatives = np.flatnonzero(same & (similarity[anchor] <= negative_max))
        if positives.size and negatives.size:
            positive = positives[np.lexsort((tiebreak[positives], -similarity[anchor, positives]))[0]]
            negative = negatives[np.lexsort((tiebreak[negatives], similarity[anchor, negatives]))[0]]
            triplets.append((anchor, positive, negative))
    return np.array(triplets, np.int64).reshape(-1, 3)


def triplet_loss(anchor: jax.Array, positive: jax.Array, negative: jax.Array, margin: float) -> jax.Array:
    """Mean over [t, dim] rows of max(0, d(a, p) - d(a, n) + margin), d = cosine distance 1 - cos."""
    def distance(x, y):
        return 1.0 - (x * y).sum(-1) / jnp.maximum(jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1), 1e-12)

    return jnp.maximum(distance(anchor, positive) - distance(anchor, negative) + margin, 0.0).mean()


def finetune_embedder(embedder: Embedder, texts: Sequence[str], triplets: np.ndarray, steps: int,
                      learning_rate: float = 1e-4, margin: float = 0.2, batch_size: int = 32,
                      seed: int = 0) -> tuple[object, list[float]]:
    """Adam on the triplet loss of mean-pooled embeddings. triplets: [t, 3] indices into texts.
    Returns (new params, the loss of each step's batch before its update)."""
    if triplets.ndim != 2 or triplets.shape[1] != 3 or len(triplets) == 0:
        raise ValueError(f"finetune_embedder: triplets must be a non-empty [t, 3] array, got {triplets.shape}")
    inputs, _ = tokenize(embedder.tokenizer, texts, embedder.max_length)  # [n, max_length] each
    optimizer = optax.adam(learning_rate)

    def loss_fn(params, batch):
        pooled = mean_pool(embedder.model, params, batch["tokens"], batch["positions"], batch["segment_ids"])
        return triplet_loss(*jnp.split(pooled, 3), margin)  # rows: anchors, then positives, then negatives

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    params, opt_state, losses = embedder.params, optimizer.init(embedder.params), []
    for _ in range(steps):
        rows = triplets[rng.choice(len(triplets), batch_size, replace=False)] if len(triplets) > batch_size \
            else triplets
        order = rows.T.reshape(-1)  # [3 * rows]
        params, opt_state, loss = step(params, opt_state, {k: v[order] for k, v in inputs.items()})
        losses.append(float(loss))
    return params, losses
