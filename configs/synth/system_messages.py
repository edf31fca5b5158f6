"""System-message synthesis (Baichuan report 4.1a) on the embedded default: 24 shipped seed system prompts are
decomposed into components, each component pool clustered, new system messages assembled with constraint prompts
and filtered (rules + critic), then a user turn and a checked response. The teacher is the embedded rule-based
stand-in: its output shows the machinery, not data quality.

    python -m alignment.launch --config=configs/synth/system_messages.py --workdir=/tmp/synth_system
"""
import ml_collections

from alignment.synth.driver import base_config


def get_config():
    c = base_config("system_messages")
    c.system_messages = ml_collections.ConfigDict(dict(
        seeds="",  # JSONL of {system, id?}: seed system prompts; '' = the shipped 24 (alignment/synth/data)
        num_items=200,  # system messages assembled (before filtering)
        attempts=3,  # tries per teacher step (decomposition, user turn, response)
        min_copied=0.9,  # share of a component's words that must occur in its seed
        embedder="",  # '' = TF-IDF word vectors; a checkpoint directory = its mean-pooled hidden states
        num_clusters=6,  # k-means clusters per component pool
        coherent_share=0.8,  # components drawn near the task (else a random member of a random cluster)
        max_words=220,  # longer assembled messages are rejected
        taxonomy="",  # constraint taxonomy JSON; '' = the shipped one
        checks="ifeval,rule",  # kinds of constraint prompt added (ifeval / rule: checked by programs; judge: critic)
        max_constraints=2,  # constraint prompts added to each message, 0 to this many
    ))
    return c
