"""Exact and near-duplicate removal over a prompt pool.

Both keep the first occurrence and return, for every removed item, the kept item it duplicates, so the
caller can count and report each removal.
"""
from __future__ import annotations

import re
from typing import NamedTuple, Sequence

import numpy as np


class Dedup(NamedTuple):
    kept: np.ndarray  # [m] int: indices of the kept items, in input order
    duplicate_of: dict[int, int]  # removed index -> the kept index it duplicates


def normalize_text(text: str) -> str:
    """Lower case, runs of whitespace collapsed to one space, ends stripped."""
    return re.sub(r"\s+", " ", text).strip().lower()


def exact_dedup(texts: Sequence[str]) -> Dedup:
    """Items whose normalised text equals an earlier item's are duplicates of that earlier item."""
    first: dict[str, int] = {}
    duplicate_of: dict[int, int] = {}
    for i, text in enumerate(texts):
        key = normalize_text(text)
        if key in first:
            duplicate_of[i] = first[key]
        else:
            first[key] = i
    return Dedup(np.array(sorted(first.values()), dtype=np.int64), duplicate_of)


def near_dedup(embeddings: np.ndarray, threshold: float) -> Dedup:
    """Greedy in input order over [n, dim] unit vectors: an item whose cosine similarity to some kept item is
    >= threshold is a duplicate of the most similar kept item; otherwise it is kept."""
    if embeddings.ndim != 2:
        raise ValueError(f"near_dedup: embeddings must be [n, dim], got shape {embeddings.shape}")
    kept: list[int] = []
    duplicate_of: dict[int, int] = {}
    for i in range(len(embeddings)):
        if kept:
            sims = embeddings[kept] @ embeddings[i]  # [len(kept)]
            best = int(np.argmax(sims))
            if sims[best] >= threshold:
                duplicate_of[i] = kept[best]
                continue
        kept.append(i)
    return Dedup(np.array(kept, dtype=np.int64), duplicate_of)
