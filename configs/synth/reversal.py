"""Response reversal (Baichuan report 4.1c) on the embedded default: quality-scored template passages in random
layouts become responses; the embedded teacher (a rule-based stand-in: its output shows the machinery, not data
quality) writes the prompts, an inspector scores them, and every measurable attribute is checked on the passage.

    python -m alignment.launch --config=configs/synth/reversal.py --workdir=/tmp/synth_reversal
"""
import ml_collections

from alignment.synth.driver import base_config


def get_config():
    c = base_config("reversal")
    c.reversal = ml_collections.ConfigDict(dict(
        passages="embedded",  # JSONL of {text, quality (0-10), id?}, or 'embedded' (generated template passages)
        num_items=200,  # passages drawn from the pool
        min_quality=5.0,  # passages scoring at or below this are dropped before any teacher call
        taxonomy="",  # constraint taxonomy JSON; '' = the shipped one (alignment/synth/data/constraints.json)
        max_rounds=3,  # prompt, inspection and revision rounds per passage
        min_score=7.0,  # the inspector's score (1-10) a prompt needs
    ))
    return c
