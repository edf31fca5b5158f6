"""GRPO with LoRA on the embedded default: the main job (configs/grpo.py: a short SFT warm start, then GRPO
with a math-answer reward) training rank-16 adapters on every projection of the frozen warm-start model. The
KL reference is that base with the adapters off (no second copy of the weights); rollouts sample base + adapters
(on CPU the engine folds them into the copy of the weights it makes anyway). Prints held-out accuracy before and
after RL.

    python -m alignment.launch --config=configs/grpo_lora.py --workdir=/tmp/grpo_lora
"""
from alignment_configs import grpo


def get_config():
    c = grpo.get_config()
    c.optimizer.lr = 2e-3  # adapters take a larger rate than the main job's full fine-tuning (1e-4)
    c.lora.enabled = True
    c.lora.rank = 16
    c.lora.alpha = 32.0
    return c
