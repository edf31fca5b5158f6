"""Shared config fields and validation. Stage configs (`configs/<stage>.py`) start from `base_config()`."""
from __future__ import annotations

import difflib
import importlib.util
import os
from typing import Iterable

import ml_collections

STAGES = {
    "sft": "alignment.stages.sft",
    "rm": "alignment.stages.rm",
    "dpo": "alignment.stages.dpo",  # also KTO: config.loss="kto"
    "grpo": "alignment.stages.grpo",
    "ppo": "alignment.stages.ppo",
    "merge": "alignment.stages.merge",
    "eval": "alignment.stages.eval",
    "generate": "alignment.stages.generate",
    "pas": "alignment.stages.pas",
}


def base_config() -> ml_collections.ConfigDict:
    """Fields every training stage has. One commented line per field."""
    c = ml_collections.ConfigDict()
    c.stage = ""  # which stage runs: one of STAGES
    c.seed = 0  # model init, data order and sampling
    c.model = ml_collections.ConfigDict()  # ModelConfig fields (see configs/models/)
    c.init_from = ""  # '' (random init), a HF directory (config.json + safetensors) or an Orbax checkpoint
    c.tokenizer = "embedded"  # 'embedded', a SentencePiece .model, a tokenizer.json, or a directory
    c.chat_template = "chatml"  # llama2 | llama3 | chatml
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, sequence=1))  # -1 takes the rest
    c.sharding_rules = ml_collections.ConfigDict()  # logical axis -> mesh axes overrides of DEFAULT_RULES
    c.batch_size = 8  # global rows per optimizer step
    c.micro_batches = 1  # gradient accumulation: batch_size is split into this many micro-batches
    c.steps = 100  # optimizer steps
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=3e-4,  # peak learning rate
        warmup_steps=10,  # linear warmup from 0
        schedule="cosine",  # cosine | linear | constant decay after warmup
        end_lr_factor=0.1,  # final lr = lr * end_lr_factor
        b1=0.9, b2=0.95, eps=1e-8,  # Adam moments
        weight_decay=0.0,  # decoupled; never applied to norms and biases
        clip_norm=1.0,  # global-norm clipping; 0 disables
    ))
    c.log_every = 10  # steps between metric records (and checks for NaN/Inf steps)
    c.max_consecutive_bad_steps = 5  # stop after this many NaN/Inf steps in a row (their updates are skipped)
    c.eval_every = 0  # steps between held-out evaluations; 0 = only at the end
    c.checkpoint = ml_collections.ConfigDict(dict(
        every=0,  # steps between checkpoints; 0 = only at the end
        keep=3,  # keep the newest N checkpoints
        async_save=True,  # write in the background while training continues
    ))
    c.peak_tflops_per_device = 0.0  # for MFU; 0 = a known figure for the accelerator, measured on CPU
    c.profile = ml_collections.ConfigDict(dict(
        enabled=False,  # write an XLA profiler trace to workdir/profile
        start_step=3,  # first traced step (after compilation)
        num_steps=2,  # how many steps to trace
    ))
    return c


def flatten_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        keys.append(name)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(flatten_keys(value, name + "."))
    return keys


def suggest(key: str, valid: Iterable[str]) -> str:
    """' Did you mean X?' for the nearest valid key, or ''."""
    near = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" Did you mean {near[0]!r}?" if near else ""


def check_override_keys(config: ml_collections.ConfigDict, argv: list[str], flag: str = "config") -> None:
    """Raise ValueError for a `--config.a.b=v` override naming a key the config does not have."""
    valid = flatten_keys(config)
    prefix = f"--{flag}."
    for arg in argv:
        if not arg.startswith(prefix):
            continue
        key = arg[len(prefix):].split("=", 1)[0]
        if key not in valid:
            raise ValueError(f"unknown config key {key!r}.{suggest(key, valid)}")


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Run a config file's `get_config()` (the ml_collections config-file idiom)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path}: a config file must define get_config()")
    return module.get_config()


def model_preset(name: str) -> ml_collections.ConfigDict:
    """A named model size from `configs/models/<name>.py`, next to the stage configs."""
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "models")
    path = os.path.join(here, f"{name}.py")
    if not os.path.isfile(path):
        available = sorted(f[:-3] for f in os.listdir(here) if f.endswith(".py") and not f.startswith("_"))
        raise ValueError(f"unknown model preset {name!r}.{suggest(name, available)} Available: {available}")
    return load_config_file(path)


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks across fields, once at start, with the offending key named."""
    if config.stage not in STAGES:
        raise ValueError(f"config.stage={config.stage!r} is not a stage.{suggest(config.stage, STAGES)} "
                         f"Stages: {sorted(STAGES)}")
    if "batch_size" not in config:  # stages that do not train (merge) have no batch or step fields
        return
    if config.batch_size <= 0 or config.steps <= 0:
        raise ValueError("config.batch_size and config.steps must be positive")
    if config.micro_batches <= 0 or config.batch_size % config.micro_batches:
        raise ValueError(f"config.micro_batches={config.micro_batches} must divide config.batch_size="
                         f"{config.batch_size}")
