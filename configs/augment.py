"""Prompt augmentation with a trained PAS model (`python -m alignment.pas`), which uses this file when no --config
is given. Give at most one of `prompt` or `input`; with neither (and no flags at all) it augments a demonstration
prompt with the embedded stand-in, offline.

    python -m alignment.pas --config.pas=/tmp/pas/pas_model --config.prompt="Write a poem about the sea."
    python -m alignment.pas --config.pas=/tmp/pas/pas_model --config.prompt="What is inflation?" \
        --config.keywords="central bank,2024"
    python -m alignment.pas --config.pas=http://127.0.0.1:8001 --config.input=prompts.jsonl \
        --config.output=augmented.jsonl

It prints only the augmented prompt (or the records); --verbosity=1 adds the libraries' log lines.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.pas = "embedded"  # a pas run's pas_model directory, the API root of a served PAS model, or 'embedded' (the
    # embedded teacher's template complements: runs offline with no trained model)
    c.model = "default"  # `model` sent to a PAS endpoint
    c.prompt = ""  # one prompt to augment, printed with its complement; '' and no input: a demonstration prompt
    c.keywords = ""  # comma-separated search keywords of a retrieval-augmented `prompt`
    c.input = ""  # JSONL of {prompt | messages, keywords?} records to augment
    c.output = ""  # where `input`'s records go, with 'complement' and 'augmented' added; '' = stdout
    c.max_new_tokens = 64  # complement length limit in tokens
    return c
