"""Constraint expansion (Baichuan report 4.1b) on the embedded default: seed instructions from the PAS pipeline's
generated pool, 1-3 constraints each from the 43-type taxonomy, instructions and responses from the embedded teacher
(a rule-based stand-in: its output shows the machinery, not data quality), every response checked.

    python -m alignment.launch --config=configs/synth/constraints.py --workdir=/tmp/synth_constraints

With a real teacher: --config.teacher.url=http://host:8000 --config.teacher.model=NAME (and teacher.api_key_env).
"""
import ml_collections

from alignment.synth.driver import base_config


def get_config():
    c = base_config("constraints")
    c.constraints = ml_collections.ConfigDict(dict(
        seeds="embedded",  # JSONL of {prompt, category?, id?}, or 'embedded' (the PAS pipeline's generated pool)
        categories="writing,knowledge,advice",  # embedded seeds only: the pool's categories to draw from
        num_items=300,  # seed instructions used (one item each)
        taxonomy="",  # constraint taxonomy JSON; '' = the shipped one (alignment/synth/data/constraints.json)
        checks="ifeval,rule,judge",  # kinds of constraint drawn: ifeval / rule (programs) and judge (the critic)
        min_constraints=1,  # constraints added per seed, at least
        max_constraints=3,  # and at most (0 and 0: the seeds unexpanded)
        expand_attempts=2,  # rewrites per seed until the validator keeps one
        attempts=3,  # responses per instruction until one meets every constraint
        max_instruction_words=200,  # the validator rejects longer instructions
        min_seed_overlap=0.6,  # share of the seed's content words the instruction must keep
        coverage_sample=100,  # kept items sampled for the taxonomy-coverage figure (the report: ~90%)
    ))
    return c
