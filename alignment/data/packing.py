"""Per-batch packing: best-fit decreasing over a buffer of samples, as a checkpointable grain dataset.

Each packed row holds several samples; `segment_ids` number them from 1 (0 = padding) and
`positions` restart at every sample, so attention never crosses samples.
"""
from __future__ import annotations

from typing import Any

import grain
import numpy as np

ROW_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of sample indices: longest first, each into the open bin it fills most tightly."""
    bins: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        size = lengths[index]
        fitting = [b for b in range(len(bins)) if free[b] >= size]
        if fitting:
            best = min(fitting, key=lambda b: free[b])
            bins[best].append(index)
            free[best] -= size
        else:
            bins.append([index])
            free.append(capacity - size)
    return bins


def pack_row(samples: list[dict[str, np.ndarray]], max_length: int) -> dict[str, np.ndarray]:
    """Concatenate samples (each with inputs/targets/loss_mask of equal length) into one padded row."""
    row = {key: np.zeros(max_length, np.bool_ if key == "loss_mask" else np.int32) for key in ROW_KEYS}
    start = 0
    for segment, sample in enumerate(samples, start=1):
        n = len(sample["inputs"])
        end = start + n
        for key in ("inputs", "targets", "loss_mask"):
            row[key][start:end] = sample[key]
        row["positions"][start:end] = np.arange(n)
        row["segment_ids"][start:end] = segment
        start = end
    return row


class _PackIterator(grain.DatasetIterator):
    """State: the parent's state before the current buffer + rows already emitted from it, so a restore
    refills the same buffer, packs it identically and skips what was emitted."""

    def __init__(self, parent: grain.DatasetIterator, buffer_size: int, max_length: int):
        super().__init__(parent)
        self._buffer_size, self._max_length = buffer_size, max_length
        self._buffer_start = parent.get_state()
        self._rows: list[dict] = []
        self._emitted = 0

    def _refill(self) -> None:
        self._buffer_start = self._parent.get_state()
        samples = []
        for _ in range(self._buffer_size):
            try:
                samples.append(next(self._parent))
            except StopIteration:
                break
        if not samples:
            raise StopIteration
        bins = best_fit_decreasing([len(s["inputs"]) for s in samples], self._max_length)
        self._rows = [pack_row([samples[i] for i in sorted(b)], self._max_length) for b in bins]
        self._emitted = 0

    def __next__(self) -> dict[str, np.ndarray]:
        if self._emitted == len(self._rows):
            self._refill()
        row = self._rows[self._emitted]
        self._emitted += 1
        return row

    def get_state(self) -> dict[str, Any]:
        return {"buffer_start": self._buffer_start, "emitted": self._emitted}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["buffer_start"])
        self._refill()
        self._emitted = state["emitted"]


class PackedDataset(grain.IterDataset):
    """Rows of `max_length` tokens packed from samples of at most `max_length` tokens."""

    def __init__(self, parent: grain.IterDataset, buffer_size: int, max_length: int):
        super().__init__(parent)
        self._buffer_size, self._max_length = buffer_size, max_length

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._buffer_size, self._max_length)
