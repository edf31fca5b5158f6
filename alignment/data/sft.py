"""The SFT data pipeline: weighted mixture of sources -> chat encoding with loss masks -> packed (or
padded) rows -> global batches, as grain datasets whose iterator state is checkpointable.

Rows: inputs, targets, loss_mask, positions, segment_ids, each [max_length]; `loss_mask[t]` says
whether predicting `targets[t]` is trained on.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import grain
import ml_collections
import numpy as np

from alignment.data.chat import encode_chat
from alignment.data.packing import ROW_KEYS, PackedDataset, pack_row
from alignment.data.sources import load_records

logger = logging.getLogger(__name__)

TRUNCATION = ("truncate", "drop")


@dataclasses.dataclass
class SourceReport:
    """What happened to one source's records, so nothing is dropped silently."""

    category: str
    path: str
    read: int = 0
    skipped: dict = dataclasses.field(default_factory=dict)
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_loss_tokens: int = 0
    tokens: int = 0


def chat_example(tokenizer, template: str, train_on: str, messages: list[dict], tools: list | None = None
                 ) -> dict[str, np.ndarray]:
    """messages (and the record's tool definitions) -> {inputs, targets, loss_mask} [n] for next-token
    prediction (n = tokens - 1)."""
    encoded = encode_chat(tokenizer, messages, template, train_on=train_on, tools=tools)
    return {"inputs": encoded.ids[:-1], "targets": encoded.ids[1:], "loss_mask": encoded.loss_mask[1:]}


def fit_length(example: dict, max_length: int, truncation: str, report: SourceReport) -> dict | None:
    """Truncate or drop an over-long example (counted); drop one with no loss tokens left (counted)."""
    if truncation not in TRUNCATION:
        raise ValueError(f"data.truncation must be one of {TRUNCATION}, got {truncation!r}")
    if len(example["inputs"]) > max_length:
        if truncation == "drop":
            report.dropped_too_long += 1
            return None
        report.truncated += 1
        example = {k: v[:max_length] for k, v in example.items()}
    if not example["loss_mask"].any():
        report.dropped_no_loss_tokens += 1
        return None
    return example


def pad_row(example: dict, max_length: int) -> dict[str, np.ndarray]:
    return pack_row([example], max_length)


def load_source(category: str, source: ml_collections.ConfigDict, data: ml_collections.ConfigDict, tokenizer,
                template: str, seed: int, num_embedded: int) -> tuple[list[dict], SourceReport]:
    """Examples of one source, fitted to `data.max_length`, and the report of what was kept."""
    report = SourceReport(category=category, path=source.path)
    encode = functools.partial(chat_example, tokenizer, template, data.train_on)
    records, stats = load_records(source.path, category=category, fmt=source.get("format", "auto"),
                                  skip_bad_records=data.skip_bad_records, seed=seed, num_embedded=num_embedded,
                                  embedded=source.get("embedded", None), tfds_data_dir=source.get("tfds_data_dir", None),
                                  encode=encode)
    report.read, report.skipped = stats.read, dict(stats.skipped)
    examples = []
    for record in records:
        example = fit_length(record["encoded"], data.max_length, data.truncation, report)
        if example is not None:
            examples.append(example)
            report.tokens += len(example["inputs"])
    report.kept = len(examples)
    if not examples:
        raise ValueError(f"data source {category!r} ({source.path}): no usable records; {report}")
    return examples, report


def load_sources(sources: ml_collections.ConfigDict, data: ml_collections.ConfigDict, tokenizer, template: str,
                 seed: int, num_embedded: int, split: str = "train") -> tuple[dict[str, list[dict]], list[SourceReport]]:
    if not sources:
        raise ValueError("no data sources configured")
    examples, reports = {}, []
    for index, (category, source) in enumerate(sorted(sources.items())):
        examples[category], report = load_source(category, source, data, tokenizer, template, seed + index,
                                                 num_embedded)
        reports.append(report)
        logger.info("%s data %s: %s", split, category, dataclasses.asdict(report))
    return examples, reports


def rows_dataset(examples: grain.IterDataset, data: ml_collections.ConfigDict) -> grain.IterDataset:
    if data.packing:
        return PackedDataset(examples, data.pack_buffer, data.max_length)
    return examples.map(functools.partial(pad_row, max_length=data.max_length))


def train_batches(examples: dict[str, list[dict]], sources: ml_collections.ConfigDict,
                  data: ml_collections.ConfigDict, batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> grain.IterDataset:
    """Infinite stream of this process's [batch_size // process_count, max_length] batches.

    Sources are shuffled, repeated and interleaved in proportion to their weights; the mixed stream
    is split across processes so each reads only its own share.
    """
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {process_count} processes")
    names = sorted(examples)
    weights = [float(sources[name].get("weight", 1.0)) for name in names]
    if any(w <= 0 for w in weights):
        raise ValueError(f"data source weights must be positive, got {dict(zip(names, weights))}")
    streams = [grain.MapDataset.source(examples[name]).seed(seed + i).shuffle().repeat(None)
               for i, name in enumerate(names)]
    mixed = grain.MapDataset.mix(streams, weights)[process_index::process_count]
    return rows_dataset(mixed.to_iter_dataset(), data).batch(batch_size // process_count, drop_remainder=True)


def eval_batches(examples: list[dict], data: ml_collections.ConfigDict, batch_size: int, process_index: int = 0,
                 process_count: int = 1, num_batches: int | None = None) -> list[dict]:
    """This process's share of the held-out examples, each exactly once, in [batch_size, max_length] batches.

    The last batch is filled with empty rows rather than dropped; `num_batches` pads with empty batches
    so that every process runs the same number of eval steps.
    """
    rows = list(rows_dataset(grain.MapDataset.source(examples[process_index::process_count]).to_iter_dataset(),
                             data))
    empty = {key: np.zeros(data.max_length, np.bool_ if key == "loss_mask" else np.int32) for key in ROW_KEYS}
    rows += [empty] * (-len(rows) % batch_size)
    if num_batches is not None:
        rows += [empty] * (num_batches * batch_size - len(rows))
    return [stack(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


def stack(rows: list[dict]) -> dict[str, np.ndarray]:
    return {key: np.stack([row[key] for row in rows]) for key in ROW_KEYS}


def reports_summary(reports: list[SourceReport]) -> dict[str, Any]:
    return {r.category: dataclasses.asdict(r) for r in reports}
