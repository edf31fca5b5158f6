"""RL prompt streams: prompts grouped by category, drawn in adjustable proportions, checkpointable.

The paper monitors per-category results during RL and shifts the data mix toward what lags; the
stream's category weights can be changed between steps, and its whole state is a small JSON dict.
"""
from __future__ import annotations

import collections
from typing import Mapping

import numpy as np

from alignment.data.sources import load_records


def prompt_messages(record: dict) -> list[dict]:
    """The conversation up to the answer: every message before the final assistant turn."""
    messages = record["messages"]
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages:
        raise ValueError("a prompt record needs at least one message before the answer")
    return messages


def load_prompts(sources: Mapping, *, seed: int, num_embedded: int, skip_bad_records: bool = False
                 ) -> dict[str, list[dict]]:
    """category -> records (chat form, with `answer` and any other fields the rewards need)."""
    by_category: dict[str, list[dict]] = collections.defaultdict(list)
    for index, (category, source) in enumerate(sorted(sources.items())):
        records, stats = load_records(source.path, category=category, fmt=source.get("format", "auto"),
                                      skip_bad_records=skip_bad_records, seed=seed + index, num_embedded=num_embedded,
                                      embedded=source.get("embedded", None))
        if not records:
            found = f"all {stats.read} records skipped {dict(stats.skipped)}" if stats.read else "it holds no records"
            raise ValueError(f"prompt source {category!r} ({source.path}): no prompts ({found})")
        for number, record in enumerate(records):
            record.setdefault("prompt_id", f"{category}-{number}")
            by_category[record["category"]].append(record)
    if not by_category:
        raise ValueError("no prompt sources configured")
    return dict(by_category)


class PromptStream:
    """Draws batches of prompts: a category by weight, then that category's next prompt in a shuffled order."""

    def __init__(self, prompts: dict[str, list[dict]], weights: Mapping[str, float], seed: int):
        unknown = set(weights) - set(prompts)
        if unknown:
            raise ValueError(f"prompt weights name categories without prompts: {sorted(unknown)}")
        self.prompts = prompts
        self.categories = sorted(prompts)
        self.state = {
            "weights": {c: float(weights.get(c, 1.0)) for c in self.categories},
            "cursor": {c: 0 for c in self.categories},
            "draws": 0,
            "seed": seed,
        }

    def _order(self, category: str, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.state["seed"], self.categories.index(category), epoch])
        return rng.permutation(len(self.prompts[category]))

    def next(self, n: int) -> list[dict]:
        weights = np.array([self.state["weights"][c] for c in self.categories])
        rng = np.random.default_rng([self.state["seed"], 1_000_003, self.state["draws"]])
        picks = rng.choice(len(self.categories), size=n, p=weights / weights.sum())
        self.state["draws"] += 1
        batch = []
        for pick in picks:
            category = self.categories[pick]
            cursor = self.state["cursor"][category]
            size = len(self.prompts[category])
            batch.append(self.prompts[category][self._order(category, cursor // size)[cursor % size]])
            self.state["cursor"][category] = cursor + 1
        return batch

    def set_weights(self, weights: Mapping[str, float]) -> None:
        for category, weight in weights.items():
            if category not in self.state["weights"] or not weight > 0:
                raise ValueError(f"bad prompt weight {category!r}: {weight}")
            self.state["weights"][category] = float(weight)

    def get_state(self) -> dict:
        return {k: dict(v) if isinstance(v, dict) else v for k, v in self.state.items()}

    def set_state(self, state: dict) -> None:
        if sorted(state["weights"]) != self.categories:
            raise ValueError(f"prompt stream state has categories {sorted(state['weights'])}, "
                             f"the data has {self.categories}")
        self.state = {k: dict(v) if isinstance(v, dict) else v for k, v in state.items()}


def reweight_by_accuracy(accuracy: Mapping[str, float], floor: float = 0.1) -> dict[str, float]:
    """New category weights: proportional to how much is left to learn (1 - accuracy), at least `floor`."""
    return {category: max(1.0 - acc, floor) for category, acc in accuracy.items()}
