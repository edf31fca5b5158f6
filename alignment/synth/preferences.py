"""Recipe 8: preference pairs from the other recipes, for the RM and DPO stages.

Every recipe run writes pairs.jsonl: for a prompt with a verified response and failed attempts, chosen = the
verified response and rejected = a failed attempt, with the checks it failed named in `rejected_failures` (e.g.
'ifeval:startend:end_checker', 'math:wrong_final_answer', 'code:tests_failed'). This recipe gathers those files from
several runs (or, with no sources, runs `recipes` first), checks every pair, drops duplicates, keeps at most
`max_per_prompt` per prompt and writes one shuffled pairs.jsonl, counted by recipe and by failing check.
"""
from __future__ import annotations

import collections
import json
import os

import numpy as np

from alignment.config import positive
from alignment.data.preference import read_lines
from alignment.synth.driver import write_jsonl

NAME = "preferences"
FIELDS = {"items_per_recipe": positive(), "max_per_prompt": positive()}
# The recipes whose runs hold pairs (reversal keeps the response fixed and varies the prompt: it has none).
PAIRED = ("system_messages", "constraints", "teacher_style", "math", "reasoning", "code")


def recipe_names(options) -> list[str]:
    return [n.strip() for n in options.recipes.split(",") if n.strip()]


def source_dirs(options) -> list[str]:
    return [s.strip() for s in options.sources.split(",") if s.strip()]


def check(options) -> None:
    unknown = [n for n in recipe_names(options) if n not in PAIRED]
    if unknown:
        raise ValueError(f"config.preferences.recipes: {unknown} make no pairs; choose from {list(PAIRED)}")
    if not recipe_names(options) and not source_dirs(options):
        raise ValueError("config.preferences needs sources (synth run directories) or recipes to run")


def resize(options, items: int) -> None:
    """A recipe's options with `items` work items (the preferences run sizes the runs it starts)."""
    options.num_items = items


def pair_problem(record: dict) -> str:
    """Why a pairs.jsonl record cannot be used ('' when it can)."""
    if not isinstance(record.get("messages"), list) or not record["messages"]:
        return "no_prompt"
    if not all(isinstance(record.get(k), str) and record[k].strip() for k in ("chosen", "rejected")):
        return "empty_response"
    if record["chosen"].strip() == record["rejected"].strip():
        return "identical_responses"
    failures = record.get("rejected_failures")
    if not isinstance(failures, list) or not failures:
        return "no_failing_check"
    return ""


def gather(sources: list[str], options, seed: int, workdir: str) -> dict:
    pairs, skipped, duplicates, seen = [], collections.Counter(), 0, set()
    for directory in sources:
        path = os.path.join(directory, "pairs.jsonl")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no pairs.jsonl (config.preferences.sources names synth run directories)")
        for where, record, error in read_lines(path):
            problem = "unreadable" if error else pair_problem(record)
            if problem:
                skipped[problem] += 1
                continue
            key = json.dumps([record["messages"], record["chosen"], record["rejected"]], sort_keys=True)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            pairs.append({"messages": record["messages"], "chosen": record["chosen"], "rejected": record["rejected"],
                          "category": str(record.get("recipe", "synth")), "recipe": str(record.get("recipe", "")),
                          "id": str(record.get("id", where)), "rejected_failures": record["rejected_failures"]})
    per_prompt, capped = collections.Counter(), []
    for pair in pairs:
        prompt = json.dumps([pair["recipe"], pair["messages"]], sort_keys=True)
        per_prompt[prompt] += 1
        if per_prompt[prompt] <= options.max_per_prompt:
            capped.append(pair)
    order = np.random.default_rng(seed).permutation(len(capped))
    write_jsonl(os.path.join(workdir, "pairs.jsonl"), [capped[i] for i in order])
    by_check = collections.Counter(f for p in capped for f in p["rejected_failures"])
    return {"recipe": NAME, "sources": sources, "pairs": len(capped),
            "by_recipe": dict(sorted(collections.Counter(p["recipe"] for p in capped).items())),
            "by_failing_check": dict(by_check.most_common()),
            "skipped": dict(skipped), "duplicates": duplicates, "over_per_prompt_cap": len(pairs) - len(capped)}
