"""Tool-use data (Baichuan report 4.5) on the embedded default: scenarios from one call to multi-turn dialogues
(single, parallel, sequential with a dependency, a failing service to retry, no fitting tool, renamed tool variants,
and the Python interpreter with reflect-and-fix turns), every call executed against the synthetic tools so each
kept dialogue is consistent. The teacher is the embedded rule-based stand-in: its output shows the machinery, not
data quality.

    python -m alignment.launch --config=configs/synth/tool_use.py --workdir=/tmp/synth_tool_use
"""
import ml_collections

from alignment.synth.driver import base_config


def get_config():
    c = base_config("tool_use")
    c.critic.enabled = False  # every check is a program: the dialogue is executed and its answer compared
    c.tool_use = ml_collections.ConfigDict(dict(
        num_items=140,  # scenarios, the seven kinds in turn
        attempts=3,  # teacher tries per step until the reply reads and its calls fit the schemas
        max_turns=4,  # assistant steps per dialogue (calls or the answer)
        sandbox_seconds=5.0,  # CPU seconds per program run (wall: twice that)
    ))
    return c
