"""LoRA SFT on the embedded default: a short full SFT warm start, then rank-8 adapters on every projection
(the base frozen) continue on the generated arithmetic task.

    python -m alignment.launch --config=configs/sft_lora.py --workdir=/tmp/sft_lora

The run's checkpoints hold only the adapters and their optimizer state (checkpoints/lora.json names the base);
`--config.lora.quantize=nf4` makes it QLoRA.
"""
from alignment_configs import sft


def get_config():
    c = sft.get_config()
    c.init_from = ""  # the base the adapters train on; '' runs warm_start first
    c.steps = 200
    c.optimizer.lr = 1e-2  # adapters take a larger rate than full fine-tuning
    c.lora.enabled = True
    c.lora.rank = 8
    c.lora.alpha = 16.0
    warm = sft.get_config()  # the full-SFT warm start run when init_from is empty
    warm.steps = 100
    c.warm_start = warm
    return c
