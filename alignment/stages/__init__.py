"""The stages and their one entry: `run(name, config, workdir)`.

A stage module holds `FIELDS` (the values its own config keys accept, declared once next to the code that
reads them), optionally `check(config)` (rules across fields), and `run(config, workdir) -> summary`. `run`
here checks the whole config before anything is built, writes `config.json`, runs a warm start first when the
config asks for one, takes the tokenizer and chat template the config leaves empty from the checkpoint it starts
from (`data.model_info`), describes the checkpoints a training stage writes (`checkpoints/model.json`), runs the
stage and writes `summary.json`. Launch, warm starts and stages that run other
stages (PAS's inner SFT and reward-model runs) all come through it.
"""
from __future__ import annotations

import importlib
import json
import logging
import os

import jax
import ml_collections

from alignment import config as config_lib
from alignment.config import Field, at_least, in_range, one_of, positive
from alignment.data import model_info
from alignment.data.chat import TEMPLATES
from alignment.models.config import COMPUTE_DTYPES
from alignment.models.lora import QUANTIZERS, LoraSpec
from alignment.train import runtime
from alignment.train.optimizer import SCHEDULES

logger = logging.getLogger(__name__)

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
    "pipeline": "alignment.stages.pipeline",  # the Baichuan order as one job: every step above, wired together
    "synth": "alignment.stages.synth",  # capability data synthesis (config.recipe): SFT and preference data
}
TRAINING = ("sft", "rm", "dpo", "grpo", "ppo")  # stages that write checkpoints to workdir/checkpoints

# Keys of `base_config()` and of the data blocks most stages share; a stage's own FIELDS add to these.
COMMON_FIELDS: dict[str, Field] = {
    "seed": at_least(0),
    "chat_template": one_of("", *TEMPLATES),
    "batch_size": positive(),
    "micro_batches": positive(),
    "steps": positive(),
    "optimizer.lr": Field(low=0, open_low=True),
    "optimizer.warmup_steps": at_least(0),
    "optimizer.schedule": one_of(*SCHEDULES),
    "optimizer.end_lr_factor": in_range(0, 1),
    "optimizer.b1": Field(low=0, high=1),
    "optimizer.b2": Field(low=0, high=1),
    "optimizer.eps": Field(low=0, open_low=True),
    "optimizer.weight_decay": Field(low=0),
    "optimizer.clip_norm": Field(low=0),
    "log_every": positive(),
    "max_consecutive_bad_steps": positive(),
    "eval_every": at_least(0),
    "checkpoint.every": at_least(0),
    "checkpoint.keep": positive(),  # 0 would keep no checkpoint: the trained model would be lost
    "peak_tflops_per_device": Field(low=0),
    "model.dtype": one_of(*COMPUTE_DTYPES),  # 'auto': bf16 compute where the hardware has native bf16 matmul
    "profile.start_step": at_least(0),
    "profile.num_steps": positive(),
    "data.max_length": positive(),
    "data.pack_buffer": positive(),
    "data.num_embedded": at_least(0),
    "data.num_embedded_eval": at_least(0),
    "data.eval_fraction": Field(low=0, high=1),
    "lora.rank": positive(),
    "lora.alpha": Field(low=0, open_low=True),
    "lora.dropout": Field(low=0, high=0.9),
    "lora.quantize": one_of(*QUANTIZERS),
    "lora.block_size": positive(),
}
LORA_STAGES = ("sft", "rm", "dpo", "grpo", "ppo")  # stages that train adapters when config.lora.enabled


def stage_module(name: str):
    if name not in STAGES:
        raise ValueError(f"config.stage={name!r} is not a stage.{config_lib.suggest(name, STAGES)} "
                         f"Stages: {sorted(STAGES)}")
    return importlib.import_module(STAGES[name])


def check(config: ml_collections.ConfigDict) -> None:
    """Every value the config holds, checked before anything runs; errors name the key (and the valid choices)."""
    module = stage_module(config.get("stage", ""))
    config_lib.check_fields(config, {**COMMON_FIELDS, **getattr(module, "FIELDS", {})})
    if "batch_size" in config and config.batch_size % config.micro_batches:
        raise ValueError(f"config.micro_batches={config.micro_batches} must divide config.batch_size="
                         f"{config.batch_size}")
    if "model" in config and "init_from" in config:
        runtime.model_config(config)  # the architecture, checked field by field (an HF init_from's own)
    if "lora" in config and config.lora.enabled:
        if config.stage not in LORA_STAGES:
            raise ValueError(f"config.lora.enabled: stage {config.stage!r} does not train adapters; "
                             f"LoRA stages: {list(LORA_STAGES)}")
        LoraSpec.from_config(config.lora)  # the targets regex and nf4 block size
    if hasattr(module, "check"):
        module.check(config)
    warm = config.get("warm_start")
    if warm is not None and warm.get("stage") and not config.init_from:
        check(warm)


def _write_json(path: str, content: dict) -> None:
    if jax.process_index() == 0:
        with open(path, "w") as f:
            json.dump(content, f, indent=2, default=str)


def make_workdir(workdir: str) -> None:
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir {workdir} is a file, not a directory")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--workdir {workdir}: cannot create the directory ({e.strerror or e})") from None


def run(name: str, config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Check `config`, run stage `name` into `workdir` (after its warm start, if any) and return its summary.
    `workdir` then holds config.json (the resolved config) and summary.json (what the stage returned)."""
    if config.get("stage") != name:
        raise ValueError(f"stage {name!r} was given a config for stage {config.get('stage')!r}")
    check(config)
    make_workdir(workdir)
    _warm_start(config, workdir)
    if "tokenizer" in config:
        model_info.resolve(config)
    _write_json(os.path.join(workdir, "config.json"), config.to_dict())
    if name in TRAINING:
        model_info.describe(os.path.join(workdir, "checkpoints"), model=runtime.model_config(config),
                            tokenizer=config.tokenizer, chat_template=config.chat_template, stage=name,
                            max_length=config.get("data", {}).get("max_length", 0))
    summary = stage_module(name).run(config, workdir)
    _write_json(os.path.join(workdir, "summary.json"), summary)
    return summary


def _warm_start(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Run `config.warm_start` (a whole stage config, e.g. a short SFT) into workdir/warm_start and start this
    stage from its final checkpoint; a finished warm start (its summary.json exists) is reused on restart."""
    warm = config.get("warm_start")
    if warm is None or not warm.get("stage") or config.init_from:
        return
    directory = os.path.join(workdir, "warm_start")
    if os.path.exists(os.path.join(directory, "summary.json")):
        logger.info("warm start: reusing the finished %s run in %s", warm.stage, directory)
    else:
        logger.info("warm start: %s stage into %s", warm.stage, directory)
        run(warm.stage, warm, directory)
    config.init_from = os.path.join(directory, "checkpoints")
