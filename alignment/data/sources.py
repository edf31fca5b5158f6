"""Record sources: the embedded generated task and JSONL files, with errors naming file and line."""
from __future__ import annotations

import json
from typing import Iterator

from alignment.data.synthetic import arithmetic_dataset

EMBEDDED = "embedded"


def read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line; bad JSON or bad UTF-8 raises naming file and line."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"data file not found: {path}") from None
    with f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: malformed JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def load_records(source: str, *, seed: int, num_embedded: int) -> list[dict]:
    """Records from `source`: 'embedded' (generated arithmetic chats) or a JSONL path of chat records."""
    if source == EMBEDDED:
        return arithmetic_dataset(num_embedded, seed)
    records = []
    for number, record in read_jsonl(source):
        if "messages" not in record:
            raise ValueError(f"{source}:{number}: missing field 'messages'")
        records.append(record)
    return records
