"""Preference pairs from the synthesis recipes for the RM and DPO stages: chosen = a verified response, rejected = a
failed attempt at the same prompt with the failing check named. With no sources it first runs the named recipes on
the embedded teacher (a rule-based stand-in: its output shows the machinery, not data quality), each into
<workdir>/<recipe>.

    python -m alignment.launch --config=configs/synth/preferences.py --workdir=/tmp/synth_pairs
    # from earlier runs: --config.preferences.sources=/tmp/synth_constraints,/tmp/synth_math
"""
import ml_collections

from alignment.synth.driver import base_config


def get_config():
    c = base_config("preferences")
    c.preferences = ml_collections.ConfigDict(dict(
        sources="",  # comma-separated synth run directories holding pairs.jsonl; '' = run `recipes` first
        recipes="constraints,math,reasoning,code",  # recipes run when there are no sources
        items_per_recipe=100,  # work items of each recipe run
        max_per_prompt=2,  # pairs kept per prompt at most
    ))
    return c
