"""Reward functions by name: math answers, the code sandbox, instruction checks, the reward model."""
