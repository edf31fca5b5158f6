"""Input pools of the recipes: JSONL records checked field by field, and seed instructions (a file, or the PAS
pipeline's generated prompt pool)."""
from __future__ import annotations

import os

import numpy as np

from alignment.data.sources import read_jsonl
from alignment.pas.data import embedded_prompts, prompt_text

EMBEDDED = "embedded"
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def read_records(path: str, fields: dict[str, type | tuple] | None = None) -> list[dict]:
    """Records of a JSONL file, each with `fields` of the given types (strings non-empty); errors name the file,
    line and field."""
    records = []
    for number, record in read_jsonl(path):
        for field, kind in (fields or {}).items():
            value = record.get(field)
            if not isinstance(value, kind) or isinstance(value, bool) or (isinstance(value, str) and not value.strip()):
                names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
                raise ValueError(f"{path}:{number}: field {field!r} must be a non-empty {names}")
        records.append({**record, "where": f"{path}:{number}"})
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def seed_prompts(path: str, num: int, categories: str, seed: int) -> list[dict]:
    """Up to `num` records {id, prompt, category}: from a JSONL file of {prompt or messages (the last user turn is
    the prompt: another recipe's sft.jsonl works), category?, id?}, or with 'embedded' the PAS pipeline's generated
    pool (exact duplicates removed) in the comma-separated `categories`."""
    if path == EMBEDDED:
        wanted = {c.strip() for c in categories.split(",") if c.strip()}
        pool = [r for r in embedded_prompts(num * 8, seed, duplicate_rate=0.0) if not wanted or r["category"] in wanted]
        unique = list({r["prompt"]: r for r in pool}.values())
        return [{"id": f"seed-{i}", "prompt": r["prompt"], "category": r["category"]}
                for i, r in enumerate(unique[:num])]
    records = read_records(path)
    order = np.random.default_rng(seed).permutation(len(records))[:num]
    return [{"id": str(records[i].get("id", records[i]["where"])),
             "prompt": prompt_text(records[i], records[i]["where"]),
             "category": str(records[i].get("category", "general"))} for i in sorted(order)]
