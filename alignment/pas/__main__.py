"""Augment prompts with a trained PAS model (one prompt, or a JSONL file of {prompt | messages, keywords?}).

    python -m alignment.pas --pas=/tmp/pas/pas_model --prompt="Write a poem about the sea."
    python -m alignment.pas --pas=/tmp/pas/pas_model --prompt="What is inflation?" --keywords="central bank,2024"
    python -m alignment.pas --pas=http://127.0.0.1:8001 --input=prompts.jsonl --output=augmented.jsonl
"""
from __future__ import annotations

import json
import sys

from absl import app, flags

from alignment.pas.augment import load_pas
from alignment.pas.data import load_prompt_pool, write_jsonl
from alignment.pas.template import combine

_PAS = flags.DEFINE_string("pas", None, "PAS model: a pas run's pas_model directory or an endpoint URL.")
_PROMPT = flags.DEFINE_string("prompt", None, "One prompt to augment.")
_KEYWORDS = flags.DEFINE_list("keywords", [], "Search keywords of a retrieval-augmented prompt.")
_INPUT = flags.DEFINE_string("input", None, "JSONL of {prompt | messages, keywords?} records.")
_OUTPUT = flags.DEFINE_string("output", None, "Where --input's records go, with 'complement' and 'augmented'.")
_MAX_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "Complement length limit in tokens.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _PAS.value or bool(_PROMPT.value) == bool(_INPUT.value):
        raise app.UsageError("give --pas and exactly one of --prompt or --input")
    pas = load_pas(_PAS.value, _MAX_TOKENS.value)
    if _PROMPT.value:
        print(pas.augment(_PROMPT.value, _KEYWORDS.value))
        return
    records = load_prompt_pool(_INPUT.value, 0, 0)
    complements = pas.complements([r["prompt"] for r in records], [r.get("keywords", ()) for r in records])
    out = [{**r, "complement": c, "augmented": combine(r["prompt"], c)} for r, c in zip(records, complements)]
    if _OUTPUT.value:
        write_jsonl(_OUTPUT.value, out)
    else:
        for record in out:
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")


def run() -> None:
    try:
        app.run(main)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    run()
