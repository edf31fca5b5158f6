"""The paper's task-aware prompt selection, end to end.

exact dedup -> embed -> near dedup -> coarse / fine k-means -> LCS-template triplets -> optional triplet
fine-tuning of the embedder and re-embedding -> hierarchical clustering with increasing thresholds, keeping a
representative (highest `quality`, else the medoid) per cluster. Every removal is counted in the report and
mapped to the item that stands for it.
"""
from __future__ import annotations

import logging
from typing import Any

import ml_collections
import numpy as np

from alignment.config import suggest
from alignment.pas.cluster import coarse_fine, hierarchical_select
from alignment.pas.data import prompt_text
from alignment.pas.dedup import exact_dedup, near_dedup
from alignment.pas.embed import Embedder
from alignment.pas.mining import finetune_embedder, mine_triplets, template_similarity, triplet_loss

logger = logging.getLogger(__name__)


def default_options() -> ml_collections.ConfigDict:
    o = ml_collections.ConfigDict()
    o.near_duplicate_similarity = 0.95  # cosine similarity at or above which a prompt repeats an earlier kept one
    o.num_coarse = 8  # coarse k-means clusters (at most the pool size)
    o.num_fine = 4  # fine k-means clusters inside each coarse cluster (at most its size)
    o.kmeans_iters = 100  # most Lloyd steps per k-means run
    o.positive_similarity = 0.7  # template LCS ratio from which a prompt in another fine cluster is a hard positive
    o.negative_similarity = 0.4  # template LCS ratio up to which a prompt in the same fine cluster is a hard negative
    o.finetune_steps = 20  # triplet-loss Adam steps on the embedder; 0 keeps the embeddings as they are
    o.learning_rate = 1e-4  # Adam learning rate of the triplet fine-tuning
    o.margin = 0.2  # triplet-loss margin, in cosine distance
    o.batch_size = 32  # triplets per fine-tuning step
    o.thresholds = (0.05, 0.1, 0.2)  # increasing cosine-distance cuts, one hierarchical round each
    o.linkage = "average"  # agglomerative linkage: single | complete | average | weighted
    o.seed = 0  # k-means++ draws, triplet tie-breaks and fine-tuning batches
    return o


def resolve_options(options: dict | ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
    """The defaults with `options` applied; an unknown key fails with the nearest valid one."""
    resolved = default_options()
    for key, value in (options or {}).items():
        if key not in resolved:
            raise ValueError(f"select_prompts: unknown option {key!r}.{suggest(key, resolved.keys())}")
        resolved[key] = value
    return resolved


def record_quality(records: list[dict]) -> np.ndarray | None:
    """[n] float `quality` of every record when any record has one (then all must), else None."""
    if not any("quality" in r for r in records):
        return None
    for i, record in enumerate(records):
        value = record.get("quality")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"record {i}: 'quality' must be a number when other records have one, got {value!r}")
    return np.array([r["quality"] for r in records], np.float64)


def select_prompts(records: list[dict], embedder: Embedder,
                   options: dict | ml_collections.ConfigDict | None = None) -> tuple[list[dict], dict[str, Any]]:
    """(kept records in input order, report). A record's text is its `prompt`, else its last user message.

    Report counts add up: input = exact_duplicates + near_duplicates + clustered + kept. The *_of /
    represented_by maps send each removed record's index to the index of the record kept in its place at that
    step (which a later step may itself remove)."""
    o = resolve_options(options)
    if not records:
        raise ValueError("select_prompts: no records")
    texts = [prompt_text(r, f"record {i}") for i, r in enumerate(records)]
    quality = record_quality(records)

    exact = exact_dedup(texts)
    pool = exact.kept  # [m] indices into records of the prompts still in play
    embeddings = embedder.embed([texts[i] for i in pool])  # [m, hidden]
    near = near_dedup(embeddings, o.near_duplicate_similarity)
    near_of = {int(pool[i]): int(pool[j]) for i, j in near.duplicate_of.items()}
    pool, embeddings = pool[near.kept], embeddings[near.kept]
    pool_texts = [texts[i] for i in pool]

    coarse, fine = coarse_fine(embeddings, o.num_coarse, o.num_fine, o.seed, spherical=True,
                               max_iters=o.kmeans_iters)
    triplets = mine_triplets(template_similarity(pool_texts), fine, o.positive_similarity,
                             o.negative_similarity, o.seed)  # [t, 3] into pool
    report: dict[str, Any] = dict(
        input=len(records), exact_duplicates=len(exact.duplicate_of), exact_duplicate_of=exact.duplicate_of,
        near_duplicates=len(near_of), near_duplicate_of=near_of, after_dedup=len(pool),
        coarse_clusters=len(np.unique(coarse)), fine_clusters=len(np.unique(fine)), triplets=len(triplets))

    if o.finetune_steps > 0 and len(triplets):
        params, curve = finetune_embedder(embedder, pool_texts, triplets, o.finetune_steps, o.learning_rate,
                                          o.margin, o.batch_size, o.seed)
        before = float(triplet_loss(*(embeddings[triplets[:, c]] for c in range(3)), o.margin))
        embeddings = embedder.embed(pool_texts, params=params)
        after = float(triplet_loss(*(embeddings[triplets[:, c]] for c in range(3)), o.margin))
        report.update(finetune_loss=curve, triplet_loss_before=before, triplet_loss_after=after)

    hierarchy = hierarchical_select(embeddings, list(o.thresholds), None if quality is None else quality[pool],
                                    o.linkage)
    kept = pool[hierarchy.kept]
    represented_by = {int(pool[i]): int(pool[r]) for i, r in enumerate(hierarchy.represented_by) if i != r}
    report.update(rounds=[dict(threshold=float(t), kept=c) for t, c in zip(o.thresholds, hierarchy.counts)],
                  clustered=len(represented_by), represented_by=represented_by, kept=len(kept))
    logger.info("prompt selection: %d in, %d exact and %d near duplicates, %d clustered away, %d kept",
                len(records), report["exact_duplicates"], report["near_duplicates"], report["clustered"], len(kept))
    return [records[i] for i in kept], report
