"""Completions for chat prompts: read JSONL (or generate arithmetic questions), write JSONL, summarise.

Output line per prompt: the record's own fields, "messages" (the prompt), "reference" (trailing assistant
messages of the record, which are not part of the prompt, when present) and "completions", a list of
num_samples {"text", "num_tokens", "finish_reason"}.
"""
from __future__ import annotations

import collections
import json
import os
import time

import ml_collections
from absl import logging

from alignment.config import Field, at_least, one_of, positive
from alignment.data.chat import encode_chat
from alignment.data.sources import EMBEDDED, read_jsonl
from alignment.data.synthetic import arithmetic_dataset
from alignment.generation.loading import build_engine
from alignment.generation.sampling import SamplingParams
from alignment.generation.text import finish

TOO_LONG = ("error", "skip")
FIELDS = {
    "too_long": one_of(*TOO_LONG),
    "prompts_per_call": positive(),
    "num_samples": positive(),
    "max_new_tokens": positive(),
    "num_embedded": positive(),
    "sampling.temperature": Field(low=0),
    "sampling.top_k": at_least(0),
    "sampling.top_p": Field(low=0, high=1, open_low=True),
    "sampling.min_p": Field(low=0, high=1),
}


def load_prompts(config: ml_collections.ConfigDict) -> list[tuple[str, dict]]:
    """(where, record) pairs; `where` is 'file:line' or 'embedded:i' for error messages."""
    if config.prompts == EMBEDDED:
        return [(f"embedded:{i}", r) for i, r in enumerate(arithmetic_dataset(config.num_embedded, config.seed))]
    records = []
    for number, record in read_jsonl(config.prompts):
        if not isinstance(record.get("messages"), list) or not record["messages"]:
            raise ValueError(f"{config.prompts}:{number}: expected a non-empty list field 'messages'")
        records.append((f"{config.prompts}:{number}", record))
    if not records:
        raise ValueError(f"{config.prompts}: no prompts (the file holds no records)")
    return records


def split_prompt(record: dict) -> tuple[list[dict], list[dict]]:
    """(prompt messages, trailing assistant messages) of a chat record."""
    messages = list(record["messages"])
    end = len(messages)
    while end > 0 and isinstance(messages[end - 1], dict) and messages[end - 1].get("role") == "assistant":
        end -= 1
    return messages[:end], messages[end:]


def with_pas(pas_config: ml_collections.ConfigDict, prompts: list[tuple]) -> list[tuple]:
    """The prompts with the PAS complement appended to each last user turn (a record's `keywords` go with it)."""
    from alignment.pas.augment import load_pas
    from alignment.pas.template import last_user_turn

    for where, _, messages, _ in prompts:  # every prompt checked before any PAS work, errors naming the line
        try:
            last_user_turn(messages)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    pas = load_pas(pas_config.target, pas_config.max_tokens, pas_config.model)
    chats = pas.augment_chats([m for _, _, m, _ in prompts], [r.get("keywords", ()) for _, r, _, _ in prompts])
    logging.info("PAS complemented %d prompts", len(prompts))
    return [(where, record, chat, reference) for (where, record, _, reference), chat in zip(prompts, chats)]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    sampling = SamplingParams(**config.sampling.to_dict())
    stop = tuple(config.stop)
    records = load_prompts(config)  # before the engine is built: a bad file fails fast
    engine, tokenizer = build_engine(config)

    prompts = [(where, record, *split_prompt(record)) for where, record in records]
    if config.pas.target:
        prompts = with_pas(config.pas, prompts)
    encoded, skipped = [], []
    for where, record, messages, reference in prompts:
        try:
            ids = encode_chat(tokenizer, messages, config.chat_template, add_generation_prompt=True).ids.tolist()
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if len(ids) + config.max_new_tokens > engine.max_len:
            if config.too_long == "error":
                raise ValueError(f"{where}: prompt of {len(ids)} tokens + max_new_tokens={config.max_new_tokens} "
                                 f"exceeds the context length {engine.max_len} (too_long='skip' skips such prompts)")
            skipped.append(where)
            continue
        encoded.append((record, messages, reference, ids))
    if skipped:
        logging.warning("skipped %d prompts too long for max_new_tokens=%d (first: %s)", len(skipped),
                        config.max_new_tokens, skipped[0])

    output = config.output or os.path.join(workdir, "completions.jsonl")
    reasons, new_tokens = collections.Counter(), 0
    start = time.perf_counter()
    with open(output, "w") as f:
        for first in range(0, len(encoded), config.prompts_per_call):
            batch = encoded[first: first + config.prompts_per_call]
            out = engine.generate([ids for *_, ids in batch], config.max_new_tokens, sampling,
                                  num_samples=config.num_samples, seeds=config.seed + first, stop_strings=stop)
            for i, (record, messages, reference, _) in enumerate(batch):
                completions = []
                for g in range(config.num_samples):
                    r = i * config.num_samples + g
                    completions.append(finish(tokenizer, out.row(r), bool(out.stopped[r]), stop))
                reasons.update(c["finish_reason"] for c in completions)
                new_tokens += sum(c["num_tokens"] for c in completions)
                line = {**record, "messages": messages, "completions": completions}
                if reference:
                    line["reference"] = reference
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
            logging.info("generated %d / %d prompts", first + len(batch), len(encoded))
    elapsed = time.perf_counter() - start
    summary = {
        "prompts": len(encoded), "skipped_too_long": len(skipped), "completions": len(encoded) * config.num_samples,
        "finish_reasons": dict(reasons), "new_tokens": new_tokens, "seconds": round(elapsed, 2),
        "tokens_per_second": round(new_tokens / max(elapsed, 1e-9), 1), "truncated_sampling": sampling.truncated,
        "output": output,
    }
    logging.info("summary: %s", summary)
    return summary
