"""DPO (or IPO, hinge, robust, KTO) on the embedded default: arithmetic pairs, the tiny model, CPU in about a minute.

    python -m alignment.launch --config=configs/dpo.py --workdir=/tmp/dpo --config.init_from=/tmp/sft/checkpoints
"""
import ml_collections

from alignment.config import base_config, model_preset


def get_config():
    c = base_config()
    c.stage = "dpo"
    c.model = model_preset("tiny")
    c.model.attention_impl = "xla_flash"  # skips the padding and cross-sequence score tiles of pair rows
    c.batch_size = 32  # pairs (KTO: examples) per optimizer step, one per row
    c.steps = 100
    c.optimizer.lr = 5e-4
    c.optimizer.warmup_steps = 10
    c.log_every = 20
    c.eval_every = 50
    c.loss = "sigmoid"  # sigmoid | robust | hinge | ipo | kto
    c.beta = 0.1  # strength of the implicit KL to the reference (IPO: its tau)
    c.label_smoothing = 0.0  # sigmoid: conservative DPO; robust: assumed label-noise rate, in [0, 0.5)
    c.reference = "precomputed"  # precomputed: one pass before training, no reference model kept | online
    c.kto = ml_collections.ConfigDict(dict(
        desirable_weight=1.0,  # lambda_D
        undesirable_weight=1.0,  # lambda_U
    ))
    c.data = ml_collections.ConfigDict(dict(
        train="embedded",  # 'embedded' (generated arithmetic pairs) or a JSONL(.gz) file (pairs; KTO: unpaired too)
        eval="embedded",  # held-out records, same forms; '' = split eval_fraction off the training records
        eval_fraction=0.1,  # share of training rows held out when eval=''
        num_embedded=2000,  # generated training pairs when train='embedded'
        num_embedded_eval=256,  # generated held-out pairs when eval='embedded'
        max_length=64,  # tokens per sequence (prompt + completion); a row holds two
        truncation="truncate",  # truncate (keep the start) | drop; both counted in the data summary
        skip_bad_records=False,  # skip and count malformed records instead of stopping at the first
        score_range=(1.0, 10.0),  # range of annotated scores (unused by the loss; validated when present)
        trim_multiple=32,  # cut shared padding of each batch to a multiple of this; 0 keeps full rows
        pairs_per_row=1,  # pairs (KTO: examples) packed back to back in one row (must divide batch_size): less padding
        share_prefix=True,  # hold the prompt both sequences of a pair share once (same losses, less compute)
    ))
    return c
