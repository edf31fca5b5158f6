"""AdamW with warmup + decay, a weight-decay mask and global-norm clipping."""
from __future__ import annotations

from typing import Any

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")


def learning_rate_schedule(lr: float, total_steps: int, warmup_steps: int, decay: str = "cosine",
                           end_lr_factor: float = 0.1) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then `decay` to `lr * end_lr_factor` at `total_steps`."""
    if decay not in SCHEDULES:
        raise ValueError(f"optimizer.schedule must be one of {SCHEDULES}, got {decay!r}")
    warmup = optax.linear_schedule(0.0, lr, max(warmup_steps, 1))
    decay_steps = max(total_steps - warmup_steps, 1)
    after = {
        "cosine": optax.cosine_decay_schedule(lr, decay_steps, alpha=end_lr_factor),
        "linear": optax.linear_schedule(lr, lr * end_lr_factor, decay_steps),
        "constant": optax.constant_schedule(lr),
    }[decay]
    return optax.join_schedules([warmup, after], [warmup_steps])


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: not on norm scales or biases."""

    def decays(path, _):
        names = [str(getattr(k, "key", k)) for k in path]
        return not any(n.endswith("norm") or n.endswith("bias") for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: Any, total_steps: int, frozen: tuple[str, ...] = ()
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """From `config.optimizer` (lr, warmup_steps, schedule, end_lr_factor, b1, b2, eps, weight_decay, clip_norm).

    frozen: top-level parameter names the loss does not read (the reward model's unused `lm_head`); they get
    no update and no optimizer state, instead of Adam moments of zero gradients and weight decay.
    """
    schedule = learning_rate_schedule(config.lr, total_steps, config.warmup_steps, config.schedule,
                                      config.end_lr_factor)
    chain = []
    if config.clip_norm:
        chain.append(optax.clip_by_global_norm(config.clip_norm))
    chain.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                             weight_decay=config.weight_decay, mask=decay_mask))
    optimizer = optax.chain(*chain)
    if frozen:
        labels = lambda params: {name: "frozen" if name in frozen else "train" for name in params}  # noqa: E731
        optimizer = optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)
    return optimizer, schedule
