"""Merge checkpoints in weight space (no training): config -> `merge_checkpoints` -> summary."""
from __future__ import annotations

import json
import os
import tempfile

import flax.linen as nn
import ml_collections
from absl import logging

from alignment import sharding
from alignment.checkpoint import checkpoint_directory, load_params
from alignment.config import Field, at_least, one_of
from alignment.data import model_info
from alignment.merge import METHODS, merge_checkpoints
from alignment.merge.demo import make_demo_checkpoints
from alignment.merge.mergekit_yaml import load_mergekit_yaml
from alignment.models import Transformer
from alignment.models.transformer import dummy_inputs
from alignment.train import adapters, runtime
from alignment.train.state import abstract_params


FIELDS = {
    "merge.method": one_of(*METHODS),
    "merge.hf_model_type": one_of("llama", "qwen2"),
    "merge.workers": at_least(0),
    "merge.memory_budget_gb": Field(low=0, open_low=True),
    "merge.shard_min_elements": at_least(0),
}


def check(config: ml_collections.ConfigDict) -> None:
    m = config.merge
    if config.mergekit_yaml and (m.models or m.base or m.overrides):
        raise ValueError("config.mergekit_yaml names the models, base and parameters: leave config.merge.models, "
                         "base and overrides unset")
    if not m.models and m.base:
        raise ValueError("config.merge.base is set but config.merge.models is empty: list the checkpoints to merge")


def input_settings(config: ml_collections.ConfigDict, path: str) -> ml_collections.ConfigDict:
    """The merge config with the architecture, tokenizer and template of the input checkpoint `path` (its model.json
    or HF files; config.model's for inputs that describe nothing, such as the demo's)."""
    settings = ml_collections.ConfigDict(config.to_dict())
    settings.init_from, settings.tokenizer, settings.chat_template = path, "", ""
    model_info.resolve(settings)
    return settings


def lora_base(path: str) -> str | None:
    """The base checkpoint a LoRA run's adapters belong to (its checkpoints/lora.json); None for a whole model."""
    info_path = os.path.join(checkpoint_directory(path), adapters.LORA_INFO)
    if not os.path.isfile(info_path):
        return None
    with open(info_path) as f:
        base = json.load(f).get("base", "")
    if not base:
        raise ValueError(f"{info_path} names no base (the run started from the seed's random init): merging needs "
                         "adapters trained from a base checkpoint (config.init_from)")
    return base


def same_checkpoint(a: str, b: str) -> bool:
    """Whether two paths name the same checkpoint (a run's workdir and its checkpoints directory are one)."""
    return os.path.realpath(checkpoint_directory(a)) == os.path.realpath(checkpoint_directory(b))


def whole_models(models: list[str], base: str, method: str, scratch: str) -> tuple[list[str], str]:
    """(models, base) with every LoRA run among `models` written whole (its base + scale * A B per adapted kernel,
    `adapters.merge_lora`) under `scratch`, so it merges as the task vector of its adapters. All LoRA runs must
    share one base, which `base` must be when set; '' becomes that base for methods on task vectors."""
    bases = {path: found for path in models if (found := lora_base(path)) is not None}
    if not bases:
        return models, base
    (first, lora_of_first), *rest = bases.items()
    for path, other in rest:
        if not same_checkpoint(other, lora_of_first):
            raise ValueError(f"LoRA runs in config.merge.models have different bases: {first} was trained on "
                             f"{lora_of_first}, {path} on {other}")
    if base and not same_checkpoint(base, lora_of_first):
        raise ValueError(f"config.merge.base={base} is not the base of the LoRA runs in config.merge.models "
                         f"({lora_of_first}, named by {first}'s lora.json)")
    if not base and METHODS[method].needs_base:
        base = lora_of_first
    whole = []
    for i, path in enumerate(models):
        if path in bases:
            logging.info("merge: %s is a LoRA run: folding its adapters into %s", path, bases[path])
            adapters.merge_lora(path, os.path.join(scratch, str(i)))
            path = os.path.join(scratch, str(i))
        whole.append(path)
    return whole, base


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    m = config.merge
    models, base = list(m.models), m.base
    yaml = load_mergekit_yaml(config.mergekit_yaml) if config.mergekit_yaml else None
    first = yaml.models[0] if yaml else (models[0] if models else "")
    settings = input_settings(config, first)
    model_cfg = runtime.model_config(settings)
    output = m.output or os.path.join(workdir, "merged")
    common = dict(output=output, hf_output=m.hf_output, seed=config.seed, overwrite=m.overwrite, workers=m.workers,
                  memory_budget_bytes=int(m.memory_budget_gb * 2**30), model_config=model_cfg,
                  model_type=m.hf_model_type, shard_min_elements=m.shard_min_elements)
    demo = not config.mergekit_yaml and not models
    if yaml:
        summary = yaml.run(**common)
    else:
        if demo:
            logging.info("config.merge.models is empty: merging the offline demo (a random base and three perturbed "
                         "copies in %s)", os.path.join(workdir, "demo"))
            base, models = make_demo_checkpoints(os.path.join(workdir, "demo"), model_cfg, seed=config.seed)
        params = {k: v for k, v in m.params.to_dict().items() if v is not None}
        with tempfile.TemporaryDirectory(prefix=".lora-whole-", dir=workdir) as scratch:  # LoRA runs written whole
            models, base = whole_models(models, base, m.method, scratch)
            summary = merge_checkpoints(models, m.method, base=base, params=params, overrides=tuple(m.overrides),
                                        **common)
    model_info.describe(output, model=model_cfg, tokenizer=settings.tokenizer, chat_template=settings.chat_template,
                        stage="merge")
    if demo:  # show that later stages can start from the result (init_from), laid out on the mesh
        mesh, rules = runtime.mesh_and_rules(config)
        boxed = abstract_params(Transformer(model_cfg), dummy_inputs())
        load_params(output, nn.meta.unbox(boxed), sharding.param_shardings(boxed, mesh, rules))
        summary["reloaded_on_mesh"] = dict(mesh.shape)
    logging.info("merge: %s", json.dumps(summary))
    return summary
