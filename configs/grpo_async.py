"""The main job pipelined: configs/grpo.py with each step's rollouts sampled from the parameters one update
old (rl.max_staleness = 1), made by a producer thread while the trainer updates the step before, and truncated
importance sampling (TIS) weighing each token by pi_old / sampler, capped at rl.is_high.

    python -m alignment.launch --config=configs/grpo_async.py --workdir=/tmp/grpo_async

On one host the producer shares the training devices; --config.rl.rollout_devices=N gives it the first N devices
(parameters copied there after each update), which is where the overlap pays on accelerators.
"""
from alignment_configs import grpo


def get_config():
    c = grpo.get_config()
    c.rl.max_staleness = 1  # step s samples from the parameters after s - 1 updates
    c.rl.is_correction = "tis"  # importance weights pi_old / sampler, truncated at rl.is_high
    return c
