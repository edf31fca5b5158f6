"""Record sources in chat form: JSONL files (chat, instruction, prompt/completion), TFDS datasets and
the embedded generated task.

Every record becomes `{"messages": [...], "category": str, ...}`. A bad record raises an error naming
its file and line, or, with `skip_bad_records`, is skipped and counted by reason in `SourceStats`.
"""
from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any, Callable, Iterator, Mapping

from alignment.data.synthetic import arithmetic_dataset
from alignment.data.tool_task import tool_arithmetic_dataset

EMBEDDED = "embedded"
EMBEDDED_TOOLS = "embedded_tools"  # the generated calculator task (`alignment.data.tool_task`)
TFDS_PREFIX = "tfds:"
FORMATS = ("auto", "chat", "instruction", "prompt_completion")


class BadRecord(ValueError):
    """A record that cannot be used; `reason` is the short key it is counted under when skipped."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass
class SourceStats:
    read: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def summary(self) -> dict:
        return {"read": self.read, "skipped": dict(self.skipped)}


def open_data_file(path: str, opener: Callable = open):
    """`opener(path, "rb")`; a path that is missing, a directory or unreadable is an error naming it."""
    try:
        return opener(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"data file not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"data file {path} is a directory; expected a JSONL file") from None
    except OSError as e:
        raise ValueError(f"cannot read data file {path}: {e.strerror or e}") from None


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    with open_data_file(path) as f:
        yield from enumerate(f, start=1)


def parse_json_line(raw: bytes) -> dict | None:
    """One JSONL line -> dict (None for a blank line); raises BadRecord for bad UTF-8 or JSON."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord("non_utf8", f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRecord("malformed_json", f"malformed JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(record, dict):
        raise BadRecord("malformed_json", f"expected a JSON object, got {type(record).__name__}")
    return record


def read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line; a bad line raises naming file and line."""
    for number, raw in _lines(path):
        try:
            record = parse_json_line(raw)
        except BadRecord as e:
            raise ValueError(f"{path}:{number}: {e}") from None
        if record is not None:
            yield number, record


def _text(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise BadRecord("missing_field", f"missing field {key!r} (fields present: {sorted(record)})")
        return ""
    if not isinstance(value, str):
        raise BadRecord("bad_field", f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def detect_format(record: dict) -> str:
    if "messages" in record:
        return "chat"
    if "instruction" in record or "output" in record:
        return "instruction"
    if "prompt" in record or "completion" in record:
        return "prompt_completion"
    raise BadRecord("missing_field", f"cannot tell the record's format from its fields {sorted(record)}; "
                                     "expected 'messages', 'instruction'/'output' or 'prompt'/'completion'")


def to_messages(record: dict, fmt: str = "auto") -> list[dict]:
    """The record's conversation as a list of {role, content} messages."""
    if fmt == "auto":
        fmt = detect_format(record)
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    if fmt == "chat":
        messages = record.get("messages")
        if not isinstance(messages, list):
            raise BadRecord("missing_field", "field 'messages' must be a list of {role, content} objects")
        return messages
    if fmt == "instruction":
        prompt = _text(record, "instruction")
        extra = _text(record, "input", required=False)
        user = f"{prompt}\n\n{extra}" if extra.strip() else prompt
        return system + [{"role": "user", "content": user},
                         {"role": "assistant", "content": _text(record, "output")}]
    if fmt == "prompt_completion":
        prompt, completion = record.get("prompt"), record.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):  # conversational prompt/completion
            return prompt + completion
        return system + [{"role": "user", "content": _text(record, "prompt")},
                         {"role": "assistant", "content": _text(record, "completion")}]
    raise ValueError(f"unknown data format {fmt!r}; choose from {FORMATS}")


def _decode(value: Any) -> Any:
    """TFDS gives bytes for text features and numpy arrays for sequences."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if hasattr(value, "tolist"):
        return _decode(value.tolist())
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    return value


def _tfds_records(spec: str, data_dir: str | None) -> Iterator[tuple[str, dict]]:
    """`tfds:name[/config]:split` through `tfds.data_source` (random access, no TensorFlow needed)."""
    import tensorflow_datasets as tfds

    body = spec[len(TFDS_PREFIX):]
    name, _, split = body.partition(":")
    source = tfds.data_source(name, split=split or "train", data_dir=data_dir or None)
    for index in range(len(source)):
        yield f"{spec}[{index}]", _decode(source[index])


def _jsonl_records(path: str) -> Iterator[tuple[str, Any]]:
    for number, raw in _lines(path):
        yield f"{path}:{number}", raw


def load_records(path: str, *, category: str, fmt: str = "auto", skip_bad_records: bool = False,
                 seed: int = 0, num_embedded: int = 0, embedded: Mapping[str, Any] | None = None,
                 tfds_data_dir: str | None = None,
                 encode: Callable[[list[dict]], Any] | None = None) -> tuple[list[dict], SourceStats]:
    """All usable records of one source, in chat form, tagged with `category`.

    `encode(messages)`, or `encode(messages, tools=...)` for a record with `tools` definitions, is stored as
    `record["encoded"]`; a ValueError from it (e.g. an unknown role or an empty assistant turn) makes the record a
    bad record like any other.
    """
    if fmt not in FORMATS:
        raise ValueError(f"data format must be one of {FORMATS}, got {fmt!r}")
    stats = SourceStats()
    if path in (EMBEDDED, EMBEDDED_TOOLS):
        generate = arithmetic_dataset if path == EMBEDDED else tool_arithmetic_dataset
        generated = generate(num_embedded, seed, **dict(embedded or {}))
        raw_records = ((f"embedded[{i}]", r) for i, r in enumerate(generated))
    elif path.startswith(TFDS_PREFIX):
        raw_records = _tfds_records(path, tfds_data_dir)
    else:
        raw_records = _jsonl_records(path)
    records = []
    for where, raw in raw_records:
        try:
            record = parse_json_line(raw) if isinstance(raw, bytes) else raw
            if record is None:
                continue
            messages = to_messages(record, fmt)
            if encode is not None:
                try:
                    tools = record.get("tools")
                    encoded = encode(messages, tools=tools) if tools else encode(messages)
                except (ValueError, KeyError, TypeError) as e:
                    raise BadRecord(_reason(str(e)), str(e)) from None
        except BadRecord as e:
            if not skip_bad_records:
                raise ValueError(f"{where}: {e} (set data.skip_bad_records=True to skip and count such records)"
                                 ) from None
            stats.skipped[e.reason] += 1
            continue
        record = dict(record, messages=messages, category=record.get("category", category))
        if encode is not None:
            record["encoded"] = encoded
        records.append(record)
    stats.read = len(records) + sum(stats.skipped.values())
    return records, stats


def _reason(message: str) -> str:
    """A short counter key for a chat validation message."""
    for key, reason in (("unknown role", "unknown_role"), ("empty", "empty_assistant"),
                        ("missing", "missing_field"), ("no assistant", "no_assistant_turn")):
        if key in message:
            return reason
    return "invalid_conversation"
