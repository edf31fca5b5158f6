"""SFT examples: chat records -> fixed-length rows of inputs/targets/loss_mask/positions/segment_ids."""
from __future__ import annotations

import collections
import dataclasses
from typing import Iterable

import grain
import numpy as np

from alignment.data.chat import encode_chat

TRUNCATION = ("truncate", "drop")


@dataclasses.dataclass
class DataStats:
    """What happened to the records, so nothing is dropped silently."""

    records: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    real_tokens: int = 0
    padded_slots: int = 0

    def summary(self) -> dict:
        util = self.real_tokens / self.padded_slots if self.padded_slots else 0.0
        return dict(dataclasses.asdict(self), token_utilisation=round(util, 4))


def chat_to_row(ids: np.ndarray, loss_mask: np.ndarray, max_length: int) -> dict[str, np.ndarray]:
    """One unpacked row [max_length]: next-token targets, loss on the target token's mask, padding = segment 0."""
    n = len(ids) - 1
    row = {
        "inputs": np.zeros(max_length, np.int32),
        "targets": np.zeros(max_length, np.int32),
        "loss_mask": np.zeros(max_length, np.bool_),
        "positions": np.zeros(max_length, np.int32),
        "segment_ids": np.zeros(max_length, np.int32),
    }
    row["inputs"][:n] = ids[:-1]
    row["targets"][:n] = ids[1:]
    row["loss_mask"][:n] = loss_mask[1:]
    row["positions"][:n] = np.arange(n)
    row["segment_ids"][:n] = 1
    return row


def encode_records(records: Iterable[dict], tokenizer, template: str, max_length: int,
                   truncation: str = "truncate", train_on: str = "all_assistant",
                   source: str = "<records>") -> tuple[list[dict], DataStats]:
    """Chat records -> rows. Over-long samples are truncated or dropped (per `truncation`) and counted."""
    if truncation not in TRUNCATION:
        raise ValueError(f"data.truncation must be one of {TRUNCATION}, got {truncation!r}")
    rows, stats = [], DataStats()
    for index, record in enumerate(records):
        stats.records += 1
        try:
            encoded = encode_chat(tokenizer, record["messages"], template, train_on=train_on)
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{source}: record {index + 1}: {e}") from None
        ids, mask = encoded.ids, encoded.loss_mask
        if len(ids) - 1 > max_length:
            if truncation == "drop":
                stats.dropped_too_long += 1
                continue
            stats.truncated += 1
            ids, mask = ids[: max_length + 1], mask[: max_length + 1]
        rows.append(chat_to_row(ids, mask, max_length))
        stats.kept += 1
        stats.real_tokens += len(ids) - 1
        stats.padded_slots += max_length
    if not rows:
        raise ValueError(f"{source}: no usable records ({stats.summary()})")
    return rows, stats


def batched(rows: list[dict], batch_size: int, seed: int, shuffle: bool = True,
            repeat: bool = True) -> grain.MapDataset:
    """A grain dataset of [batch_size, max_length] batches; its iterator state is checkpointable."""
    ds = grain.MapDataset.source(rows)
    if shuffle:
        ds = ds.seed(seed).shuffle()
    if repeat:
        ds = ds.repeat(None)
    return ds.batch(batch_size, drop_remainder=True)


def stack(rows: list[dict]) -> dict[str, np.ndarray]:
    out = collections.defaultdict(list)
    for row in rows:
        for key, value in row.items():
            out[key].append(value)
    return {key: np.stack(values) for key, values in out.items()}
