"""Reasoning data (Baichuan report 4.3) on the embedded default: generated puzzles (ordering, weekdays, counting,
syllogisms) in three difficulties, fewer easy ones, chain-of-thought solutions and reflection traces on a student's
wrong answers, all verified against the reference. The teacher is the embedded rule-based stand-in: its output shows
the machinery, not data quality.

    python -m alignment.launch --config=configs/synth/reasoning.py --workdir=/tmp/synth_reasoning
"""
import ml_collections

from alignment.synth.driver import base_config


def get_config():
    c = base_config("reasoning")
    c.reasoning = ml_collections.ConfigDict(dict(
        problems="embedded",  # JSONL of {problem, answer, difficulty (easy|medium|hard)}, or 'embedded' (generated)
        num_items=300,  # problems drawn before the easy share is reduced
        easy_keep=0.5,  # share of the easy problems kept (the difficulty-distribution knob)
        reflection_share=0.5,  # problems that get a student's attempt and, when it is wrong, a reflection trace
        attempts=3,  # teacher tries per problem until one is verified
    ))
    return c
