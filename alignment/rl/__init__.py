"""What the RL stages (GRPO, PPO) share: rollouts and their rewards, policy/reference scoring, and the
driver that runs the RL steps with evaluation, checkpoints and resume around a stage's own update."""
