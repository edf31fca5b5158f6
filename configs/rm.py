"""Reward model on the embedded default: the tiny model learns to prefer correct arithmetic answers on CPU.

    python -m alignment.launch --config=configs/rm.py --workdir=/tmp/rm
HH-RLHF: --config.data.train=/path/harmless-base/test.jsonl.gz --config.data.eval= --config.data.eval_fraction=0.1
"""
import ml_collections

from alignment.config import base_config, model_preset


def get_config():
    c = base_config()
    c.stage = "rm"
    c.model = model_preset("tiny")
    c.model.attention_impl = "xla_flash"  # skips the padding and cross-sequence score tiles of pair rows
    c.model.value_head = True  # the scalar head on the policy trunk scores each sequence's last token
    c.batch_size = 32  # pairs per optimizer step (one pair per row)
    c.steps = 150
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 15
    c.log_every = 25
    c.eval_every = 50
    c.rm = ml_collections.ConfigDict(dict(
        alpha=0.5,  # weight of the squared error to annotated absolute scores (pairs without scores: 0)
        use_margin=False,  # subtract each pair's margin inside the Bradley-Terry term
    ))
    c.data = ml_collections.ConfigDict(dict(
        train="embedded",  # 'embedded' (generated arithmetic pairs) or a JSONL(.gz) file of preference records
        eval="embedded",  # held-out records, same forms; '' = split eval_fraction off the training records
        eval_fraction=0.1,  # share of training pairs held out when eval=''
        num_embedded=3000,  # generated training pairs when train='embedded'
        num_embedded_eval=256,  # generated held-out pairs when eval='embedded'
        max_length=64,  # tokens per sequence (prompt + completion); a row holds chosen and rejected
        truncation="truncate",  # truncate (keep the start) | drop; both counted in the data summary
        skip_bad_records=False,  # skip and count malformed records instead of stopping at the first
        score_range=(1.0, 10.0),  # range of the annotated scores, mapped to [0, 1]
        trim_multiple=32,  # cut shared padding of each batch to a multiple of this; 0 keeps full rows
        pairs_per_row=1,  # pairs packed back to back in one row (must divide batch_size): less padding
        share_prefix=True,  # hold the prompt both sequences of a pair share once (same losses, less compute)
    ))
    return c
