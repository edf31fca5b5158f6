"""Append-only JSONL caches of generations and judgements, keyed by sample id and a hash of the input.

A resumed run looks every sample up before generating or judging; a changed prompt, template or sampling
setting changes the hash, so stale entries are never reused. Each record is flushed as soon as it exists,
so an interrupted run loses at most the line being written (a torn last line is skipped and counted).
"""
from __future__ import annotations

import hashlib
import json
import os

from absl import logging


def input_hash(*parts) -> str:
    """A short stable digest of JSON-serialisable inputs."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class JsonlCache:
    """{key: record} backed by a JSONL file of {"key": ..., **record} lines; later lines win."""

    def __init__(self, path: str):
        self.path = path
        self.records: dict[str, dict] = {}
        self.torn_lines = 0
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                        self.records[record.pop("key")] = record
                    except (json.JSONDecodeError, KeyError, AttributeError):
                        self.torn_lines += 1
            if self.torn_lines:
                logging.warning("%s: skipped %d unreadable line(s) (an interrupted write); those samples "
                                "will be redone", path, self.torn_lines)

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def put(self, key: str, record: dict) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, **record}, ensure_ascii=False) + "\n")
        self.records[key] = record
