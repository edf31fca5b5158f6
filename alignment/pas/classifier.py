"""Prompt classifier: one softmax head per label dimension on the mean-pooled hidden states of a project model.

The dimensions follow the paper's prompt taxonomy (ability, domain, language, difficulty, constraint level);
each is a record field holding a string label, and its vocabulary is the sorted labels of the training records
unless given. The head reads `features`: the unit-normalised `embed.mean_pool`, the same vectors `Embedder.embed`
returns, so a frozen encoder's features are computed once and a fine-tuned one gives the same input in the loss.

Per prompt the loss is the sum over dimensions of softmax cross-entropy; `classification_loss` returns
(sum, count, metrics) like the project's other losses. Uses: `predict`, `balance` (subsample to target label
proportions) and `route` (send each prompt to the destination of its predicted label).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Sequence

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from alignment.pas.data import prompt_text
from alignment.pas.embed import Embedder, mean_pool, normalize, tokenize

logger = logging.getLogger(__name__)

DIMENSIONS = ("ability", "domain", "language", "difficulty", "constraint_level")


# --- labels ----------------------------------------------------------------------------------------------------

def _field_label(record: dict, index: int, dimension: str) -> str:
    if dimension not in record:
        raise ValueError(f"record {index}: missing label field {dimension!r}")
    value = record[dimension]
    if not isinstance(value, str):
        raise ValueError(f"record {index}: label field {dimension!r} must be a string, got {value!r}")
    return value


def label_vocabularies(records: Sequence[dict], dimensions: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """{dimension: sorted labels found in the records}."""
    return {dim: tuple(sorted({_field_label(r, i, dim) for i, r in enumerate(records)})) for dim in dimensions}


def encode_labels(records: Sequence[dict], vocabs: dict[str, Sequence[str]]) -> dict[str, np.ndarray]:
    """{dimension: [n] int32 label indices}; a missing field or a label outside the vocabulary raises naming
    the record index and the field."""
    out = {}
    for dim, vocab in vocabs.items():
        index_of = {label: k for k, label in enumerate(vocab)}
        ids = []
        for i, record in enumerate(records):
            label = _field_label(record, i, dim)
            if label not in index_of:
                raise ValueError(f"record {i}: field {dim!r} has unknown label {label!r} (known: {list(vocab)})")
            ids.append(index_of[label])
        out[dim] = np.asarray(ids, np.int32)
    return out


# --- the head and its loss -------------------------------------------------------------------------------------

def init_head(hidden: int, vocabs: dict[str, Sequence[str]]) -> dict:
    """{dimension: {"kernel": [hidden, labels], "bias": [labels]}} zeros: the loss is convex in the head, so
    any start works and zeros make training deterministic."""
    return {dim: {"kernel": jnp.zeros((hidden, len(vocab)), jnp.float32), "bias": jnp.zeros(len(vocab), jnp.float32)}
            for dim, vocab in vocabs.items()}


def head_logits(head: dict, features: jax.Array) -> dict[str, jax.Array]:
    """features [b, hidden] -> {dimension: [b, labels]} logits."""
    return {dim: features @ layer["kernel"] + layer["bias"] for dim, layer in head.items()}


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """logits [b, k] float, labels [b] int -> [b] -log softmax(logits)[label]."""
    picked = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def classification_loss(head: dict, features: jax.Array, labels: dict[str, jax.Array]):
    """-> (summed loss over prompts and dimensions, prompts, {"<dim>_correct": correct predictions})."""
    total, metrics = jnp.float32(0.0), {}
    for dim, logits in head_logits(head, features).items():
        total = total + cross_entropy(logits, labels[dim]).sum()
        metrics[f"{dim}_correct"] = jnp.sum(jnp.argmax(logits, -1) == labels[dim])
    return total, features.shape[0], metrics


def features(model, encoder_params: Any, batch: dict) -> jax.Array:
    """Tokenized batch [b, seq] -> [b, hidden] unit-norm mean-pooled hidden states (what `Embedder.embed` gives)."""
    return normalize(mean_pool(model, encoder_params, batch["tokens"], batch["positions"], batch["segment_ids"]))


# --- the classifier --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Classifier:
    embedder: Embedder
    head: dict
    vocabs: dict[str, tuple[str, ...]]
    encoder_tuned: bool = False  # the embedder's parameters were fine-tuned with the head (and are saved with it)

    def predict(self, texts: Sequence[str]) -> list[dict[str, tuple[str, float]]]:
        """One {dimension: (most likely label, its probability)} per text."""
        probs = {dim: np.asarray(jax.nn.softmax(logits, axis=-1))
                 for dim, logits in head_logits(self.head, jnp.asarray(self.embedder.embed(texts))).items()}
        return [{dim: (self.vocabs[dim][int(p[i].argmax())], float(p[i].max())) for dim, p in probs.items()}
                for i in range(len(texts))]

    def save(self, path: str) -> None:
        """An .npz of the head ("<dim>/kernel", "<dim>/bias"), the vocabularies (JSON) and, when fine-tuned, the
        encoder ("encoder/<param path>")."""
        arrays = {f"{dim}/{name}": np.asarray(value) for dim, layer in self.head.items() for name, value in
                  layer.items()}
        arrays["vocabs"] = np.asarray(json.dumps(self.vocabs))
        if self.encoder_tuned:
            flat = flax.traverse_util.flatten_dict(self.embedder.params, sep="/")
            arrays.update({f"encoder/{key}": np.asarray(value) for key, value in flat.items()})
        with open(path, "wb") as f:  # a file object: np.savez would append .npz to a path without it
            np.savez(f, **arrays)


def load_classifier(path: str, embedder: Embedder) -> Classifier:
    """A saved classifier on `embedder` (whose parameters are replaced by saved fine-tuned ones, if any)."""
    with np.load(path, allow_pickle=False) as data:
        vocabs = {dim: tuple(labels) for dim, labels in json.loads(str(data["vocabs"])).items()}
        head = {dim: {name: jnp.asarray(data[f"{dim}/{name}"]) for name in ("kernel", "bias")} for dim in vocabs}
        encoder = {key[len("encoder/"):]: data[key] for key in data.files if key.startswith("encoder/")}
    hidden = embedder.model.config.hidden_size
    for dim, layer in head.items():
        if layer["kernel"].shape != (hidden, len(vocabs[dim])):
            raise ValueError(f"{path}: head {dim!r} is {layer['kernel'].shape}, expected ({hidden}, "
                             f"{len(vocabs[dim])}) for this embedder and vocabulary")
    if encoder:
        expected = {k: v.shape for k, v in flax.traverse_util.flatten_dict(embedder.params, sep="/").items()}
        found = {k: v.shape for k, v in encoder.items()}
        if found != expected:
            raise ValueError(f"{path}: saved encoder parameters do not match the embedder's model "
                             f"(differing: {sorted(set(found.items()) ^ set(expected.items()))[:5]})")
        params = flax.traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in encoder.items()}, sep="/")
        embedder = dataclasses.replace(embedder, params=params)
    return Classifier(embedder, head, vocabs, encoder_tuned=bool(encoder))


def train_classifier(records: Sequence[dict], embedder: Embedder, dimensions: Sequence[str] = DIMENSIONS, *,
                     vocabs: dict[str, Sequence[str]] | None = None, steps: int = 200, batch_size: int = 32,
                     lr: float = 1e-2, finetune_encoder: bool = False, encoder_lr: float = 1e-4,
                     seed: int = 0) -> tuple[Classifier, list[float]]:
    """Train the heads with Adam on random batches of the records' prompts; returns (classifier, mean loss per
    step). The encoder stays frozen (features computed once) unless `finetune_encoder`, which trains it too at
    `encoder_lr`."""
    if not records:
        raise ValueError("no records to train the classifier on")
    vocabs = {dim: tuple(v) for dim, v in (vocabs or label_vocabularies(records, dimensions)).items()}
    labels = encode_labels(records, vocabs)
    texts = [prompt_text(record, f"record {i}") for i, record in enumerate(records)]
    model = embedder.model
    params = {"head": init_head(model.config.hidden_size, vocabs)}
    if finetune_encoder:
        params["encoder"] = embedder.params
        inputs, truncated = tokenize(embedder.tokenizer, texts, embedder.max_length)
        if truncated:
            logger.info("classifier: %d of %d prompts cut to %d tokens", truncated, len(texts), embedder.max_length)
    else:
        inputs = {"features": embedder.embed(texts)}
    rates = {"head": lr, "encoder": encoder_lr}
    optimizer = optax.multi_transform({part: optax.adam(rates[part]) for part in params},
                                      {part: jax.tree.map(lambda _, p=part: p, tree) for part, tree in params.items()})

    def mean_loss(params, batch):
        x = features(model, params["encoder"], batch) if "encoder" in params else batch["features"]
        total, count, _ = classification_loss(params["head"], x, batch["labels"])
        return total / count

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(mean_loss)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    rng = np.random.default_rng(seed)
    size = min(batch_size, len(texts))  # one batch shape, one compile
    losses = []
    for _ in range(steps):
        rows = rng.choice(len(texts), size, replace=False)
        batch = {**{k: v[rows] for k, v in inputs.items()}, "labels": {d: v[rows] for d, v in labels.items()}}
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
    if finetune_encoder:
        embedder = dataclasses.replace(embedder, params=params["encoder"])
    return Classifier(embedder, params["head"], vocabs, encoder_tuned=finetune_encoder), losses


# --- using the labels ------------------------------------------------------------------------------------------

def _label(labels: Sequence[dict], index: int, dimension: str) -> str:
    """The label of `labels[index][dimension]`: a `predict` pair (label, prob) or a plain string."""
    if dimension not in labels[index]:
        raise ValueError(f"record {index}: no label for dimension {dimension!r}")
    value = labels[index][dimension]
    return value if isinstance(value, str) else value[0]


def balance(records: Sequence[dict], labels: Sequence[dict], dimension: str, proportions: dict[str, float],
            seed: int = 0) -> tuple[list[dict], dict[str, dict[str, int]]]:
    """Subsample records so their `dimension` labels follow `proportions` (weights, normalised), keeping as
    many records as the scarcest label allows; records whose label has no proportion are all dropped.

    Returns (kept records in their original order, {label: {"available", "kept", "dropped"}}).
    `labels[i]` is record i's `predict` output (or {dimension: label}).
    """
    if len(labels) != len(records):
        raise ValueError(f"{len(labels)} labels for {len(records)} records")
    total = sum(proportions.values())
    if any(w < 0 for w in proportions.values()) or total <= 0:
        raise ValueError(f"proportions must be non-negative with a positive sum, got {proportions}")
    by_label: dict[str, list[int]] = {}
    for i in range(len(records)):
        by_label.setdefault(_label(labels, i, dimension), []).append(i)
    share = {label: w / total for label, w in proportions.items() if w > 0}
    missing = [label for label in share if label not in by_label]
    if missing:
        raise ValueError(f"no records labelled {missing} in {dimension!r}; present: {sorted(by_label)}")
    size = min(len(by_label[label]) / p for label, p in share.items())  # the most the scarcest label allows
    rng = np.random.default_rng(seed)
    keep, report = [], {}
    for label in sorted(by_label):
        members = by_label[label]
        n = int(np.floor(size * share.get(label, 0.0) + 1e-9))  # 1e-9: 30 / 0.3 * 0.3 is 29.999...
        keep.extend(rng.choice(members, n, replace=False).tolist())
        report[label] = {"available": len(members), "kept": n, "dropped": len(members) - n}
    logger.info("balance on %s: %s", dimension, report)
    return [records[i] for i in sorted(keep)], report


def route(labels: Sequence[dict], dimension: str, routes: dict[str, str], *, default: str | None = None,
          min_prob: float = 0.0) -> list[str]:
    """The destination of each prompt: routes[its label], or `default` when the label has no route or the
    prediction's probability is below `min_prob`; with no default such a prompt raises naming its index."""
    destinations = []
    for i, entry in enumerate(labels):
        label = _label(labels, i, dimension)
        prob = 1.0 if isinstance(entry[dimension], str) else float(entry[dimension][1])
        if label in routes and prob >= min_prob:
            destinations.append(routes[label])
        elif default is not None:
            destinations.append(default)
        else:
            raise ValueError(f"record {i}: label {label!r} ({dimension}, p={prob:.2f}) has no route and no default")
    return destinations
