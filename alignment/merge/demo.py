"""Offline demo inputs: a random base of a model and perturbed copies, as Orbax checkpoints like training writes."""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from alignment.models import ModelConfig, Transformer
from alignment.models.transformer import dummy_inputs
from alignment.train.state import abstract_params


def random_params(config: ModelConfig, rng: np.random.Generator) -> dict:
    """float32 params of `config` drawn N(0, initializer_range^2), norm scales N(1, ...): shapes from the model."""
    shapes = nn.meta.unbox(abstract_params(Transformer(config), dummy_inputs()))

    def draw(path, leaf):
        centre = 1.0 if "norm" in jax.tree_util.keystr(path) else 0.0
        return (centre + config.initializer_range * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def save_params(directory: str, params: dict) -> None:
    """`params` as step 0 of `directory` in the layout of `alignment.checkpoint` (state item with params)."""
    with ocp.CheckpointManager(directory, item_handlers={"state": ocp.StandardCheckpointHandler()}) as manager:
        manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params})))
        manager.wait_until_finished()


def make_demo_checkpoints(directory: str, config: ModelConfig, num_models: int = 3, scale: float = 0.01,
                          seed: int = 0) -> tuple[str, list[str]]:
    """(base path, fine-tuned paths): a random base and `num_models` copies with N(0, scale^2) deltas.

    The deltas share a common component, so the task vectors are correlated like real fine-tunes of
    one base and Model Stock has an angle to work with.
    """
    rng = np.random.default_rng(seed)
    base = random_params(config, rng)
    shared = jax.tree.map(lambda x: scale * rng.standard_normal(x.shape).astype(np.float32), base)
    save_params(os.path.join(directory, "base"), base)
    paths = []
    for i in range(num_models):
        own = jax.tree.map(lambda x, s: x + s + scale * rng.standard_normal(x.shape).astype(np.float32), base, shared)
        paths.append(os.path.join(directory, f"ft{i}"))
        save_params(paths[-1], own)
    return os.path.join(directory, "base"), paths
