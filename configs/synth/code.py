"""Code data (Baichuan report 4.4) on the embedded default: 32 shipped requests (Python with tests, JavaScript, Go,
concept questions, a few impossible ones) labelled by the teacher, rebalanced, answered, checked for conformance and
run against their tests in the sandbox, with harder follow-up turns. The teacher is the embedded rule-based
stand-in: its output shows the machinery, not data quality.

    python -m alignment.launch --config=configs/synth/code.py --workdir=/tmp/synth_code
"""
import ml_collections

from alignment.synth.driver import base_config


def get_config():
    c = base_config("code")
    c.code = ml_collections.ConfigDict(dict(
        pool="",  # JSONL of {prompt, language, tests?, category?, difficulty?, id?}; '' = the shipped requests
        num_items=1000,  # records read from the pool at most
        attempts=3,  # teacher tries per step (labels, answers, follow-ups)
        knowledge_keep=0.2,  # share of knowledge Q&A kept (the report: downsampled by 80%)
        max_language_share=0.6,  # no language above this share of the pool
        follow_up_share=0.5,  # records with tests that get a harder second turn
        min_answer_words=20,  # a concept answer needs this many words
        sandbox_seconds=5.0,  # CPU seconds per test run (wall: twice that)
    ))
    return c
