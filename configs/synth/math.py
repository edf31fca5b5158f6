"""Math data (Baichuan report 4.2) on the embedded default: problems generated for 10 knowledge points x 3 levels
(data/math_taxonomy.json), sampled evenly, solved step by step with the reference as a check, verified with
math-verify and stripped of reference mentions. The teacher is the embedded rule-based stand-in: its output shows the
machinery, not data quality.

    python -m alignment.launch --config=configs/synth/math.py --workdir=/tmp/synth_math
    # math at 20% of an SFT mix with other records: --config.math.mix_with=/tmp/synth_constraints/sft.jsonl
"""
import ml_collections

from alignment.synth.driver import base_config


def get_config():
    c = base_config("math")
    c.math = ml_collections.ConfigDict(dict(
        problems="embedded",  # JSONL of {problem, answer, level, knowledge_point}, or 'embedded' (generated)
        taxonomy="",  # levels and knowledge points JSON; '' = the shipped one (alignment/synth/data)
        num_items=300,  # problems, the same number from every (knowledge point, level) cell
        attempts=3,  # solutions per problem until one is verified
        min_steps=2,  # solution lines before the final answer
        share=0.2,  # math's share of the mixed SFT data (the report: about 20%)
        mix_with="",  # comma-separated SFT JSONL files to mix with into mixed.jsonl; '' = no mix written
    ))
    return c
