"""Teacher-style responses (Baichuan report 4.1d) on the embedded default: the intent / thought process / analogy /
principles / answer structure for instructions from the PAS pipeline's generated pool, each response checked for the
structure and by the critic. The teacher is the embedded rule-based stand-in: its output shows the machinery, not
data quality.

    python -m alignment.launch --config=configs/synth/teacher_style.py --workdir=/tmp/synth_teacher_style
"""
import ml_collections

from alignment.synth.driver import base_config


def get_config():
    c = base_config("teacher_style")
    c.teacher_style = ml_collections.ConfigDict(dict(
        seeds="embedded",  # JSONL of {prompt or messages, category?, id?} (e.g. a constraints run's sft.jsonl)
        categories="knowledge,advice,writing",  # embedded seeds only: the pool's categories to draw from
        num_items=200,  # instructions answered
        attempts=3,  # responses per instruction until one passes
        min_answer_words=20,  # the answer part needs at least this many words
    ))
    return c
