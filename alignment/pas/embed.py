"""Prompt embeddings from any project model: mean-pooled final hidden states.

`mean_pool` is a pure function of the parameters (the triplet fine-tuning differentiates through it);
`Embedder` wraps a model, its parameters and tokenizer into `embed(texts) -> [n, hidden]` unit vectors.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alignment.data.tokenizer import Tokenizer
from alignment.generation.loading import load
from alignment.models import Transformer

logger = logging.getLogger(__name__)


def tokenize(tokenizer: Tokenizer, texts: Sequence[str], max_length: int) -> tuple[dict[str, np.ndarray], int]:
    """texts -> ({tokens, positions, segment_ids} [n, max_length] int32, how many texts were cut to max_length).

    Rows are right-padded with segment 0; texts longer than max_length keep their first max_length tokens.
    """
    tokens = np.zeros((len(texts), max_length), np.int32)
    segments = np.zeros_like(tokens)
    truncated = 0
    for row, text in enumerate(texts):
        ids = tokenizer.encode(text)
        if len(ids) > max_length:
            ids, truncated = ids[:max_length], truncated + 1
        if not ids:  # an empty text still gets one (pad) token so its mean is defined
            ids = [tokenizer.pad_id]
        tokens[row, :len(ids)], segments[row, :len(ids)] = ids, 1
    positions = np.broadcast_to(np.arange(max_length, dtype=np.int32), tokens.shape).copy()
    return {"tokens": tokens, "positions": positions, "segment_ids": segments}, truncated


def mean_pool(model: Transformer, params: Any, tokens: jax.Array, positions: jax.Array,
              segment_ids: jax.Array) -> jax.Array:
    """[batch, seq] inputs -> [batch, hidden] float32: the mean final hidden state over real (segment > 0) tokens."""
    hidden = model.apply({"params": params}, tokens, positions, segment_ids).astype(jnp.float32)
    mask = (segment_ids > 0).astype(jnp.float32)[..., None]
    return (hidden * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)


def normalize(x: jax.Array | np.ndarray, eps: float = 1e-12):
    """Rows scaled to unit L2 norm (cosine similarity becomes a dot product)."""
    xp = jnp if isinstance(x, jax.Array) else np
    return x / xp.maximum(xp.linalg.norm(x, axis=-1, keepdims=True), eps)


@dataclasses.dataclass
class Embedder:
    """A model + parameters + tokenizer that turns texts into unit-norm embeddings."""

    model: Transformer
    params: Any
    tokenizer: Tokenizer
    max_length: int = 128
    batch_size: int = 64

    def __post_init__(self):
        self._pool = jax.jit(lambda params, batch: mean_pool(self.model, params, batch["tokens"],
                                                             batch["positions"], batch["segment_ids"]))

    def embed(self, texts: Sequence[str], params: Any = None) -> np.ndarray:
        """texts -> [len(texts), hidden] float32 unit vectors. `params` overrides the embedder's own."""
        params = self.params if params is None else params
        batch, truncated = tokenize(self.tokenizer, texts, self.max_length)
        if truncated:
            logger.info("embeddings: %d of %d texts cut to %d tokens", truncated, len(texts), self.max_length)
        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = {k: v[start:start + self.batch_size] for k, v in batch.items()}
            pad = self.batch_size - len(chunk["tokens"])  # one compiled shape for every chunk
            chunk = {k: np.pad(v, ((0, pad), (0, 0))) for k, v in chunk.items()}
            out.append(np.asarray(self._pool(params, chunk))[: self.batch_size - pad])
        if not out:
            return np.zeros((0, self.model.config.hidden_size), np.float32)
        return normalize(np.concatenate(out))


def embedder_from_config(config: ml_collections.ConfigDict, max_length: int = 128, batch_size: int = 64) -> Embedder:
    """An Embedder over `config.model` / `config.init_from` / `config.tokenizer` (random init from `config.seed`
    when init_from is empty), on one device: embedding a prompt pool is inference on small batches."""
    loaded = load(ml_collections.ConfigDict(config.to_dict()), single_device=True)
    return Embedder(loaded.model, loaded.params, loaded.tokenizer, max_length, batch_size)
