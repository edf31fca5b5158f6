"""Augment prompts with a trained PAS model (one prompt, or a JSONL file of {prompt | messages, keywords?}).

    python -m alignment.pas --config.pas=/tmp/pas/pas_model --config.prompt="Write a poem about the sea."
    python -m alignment.pas --config.pas=/tmp/pas/pas_model --config.prompt="What is inflation?" \
        --config.keywords="central bank,2024"
    python -m alignment.pas --config.pas=http://127.0.0.1:8001 --config.input=prompts.jsonl \
        --config.output=augmented.jsonl

Settings are configs/augment.py's keys (that file is the default --config). Only the answer is printed: the
augmented prompt, or the records when there is no `output`; --verbosity=1 adds the libraries' log lines.
"""
from __future__ import annotations

import json
import sys

import ml_collections

from alignment import config as config_lib
from alignment.config import positive
from alignment.pas.augment import load_pas
from alignment.pas.data import load_prompt_pool, write_jsonl
from alignment.pas.template import combine

DEMO_PROMPT = "Write a poem about the sea."  # augmented when neither a prompt nor an input file is given
# The values of configs/augment.py's keys, checked before the PAS model is loaded.
FIELDS = {"max_new_tokens": positive()}


def check(config: ml_collections.ConfigDict) -> None:
    config_lib.check_fields(config, FIELDS)
    if not config.pas:
        raise ValueError("config.pas is required: a pas run's pas_model directory, the API root of a PAS model or "
                         "'embedded'")
    if config.prompt and config.input:
        raise ValueError("give one of config.prompt (one prompt) or config.input (a JSONL file), not both")
    if config.input and config.keywords:
        raise ValueError("config.keywords go with config.prompt; config.input's records carry their own 'keywords'")
    if config.prompt and config.output:
        raise ValueError("config.output is where config.input's records go; config.prompt's answer is printed")


def main(config: ml_collections.ConfigDict) -> None:
    check(config)
    pas = load_pas(config.pas, config.max_new_tokens, config.model)
    if not config.input:
        prompt = config.prompt or DEMO_PROMPT
        print(pas.augment(prompt, [k.strip() for k in config.keywords.split(",") if k.strip()]))
        return
    records = load_prompt_pool(config.input, 0, 0)
    complements = pas.complements([r["prompt"] for r in records], [r.get("keywords", ()) for r in records])
    out = [{**r, "complement": c, "augmented": combine(r["prompt"], c)} for r, c in zip(records, complements)]
    if config.output:
        write_jsonl(config.output, out)
    else:
        for record in out:
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")


def run() -> None:
    # RuntimeError: a PAS endpoint that fails or cannot be reached (the message names its URL).
    config_lib.run_command_line(main, "augment", errors=(RuntimeError,))


if __name__ == "__main__":
    run()
