"""The stage contract: every config checked before anything runs (choices, ranges, nearest keys and aliases),
every config file valid and dry-runnable, and the one writer of config.json / summary.json."""
import importlib
import json
import subprocess
import sys

import ml_collections
import pytest

from alignment import config as config_lib
from alignment import stages
from alignment.launch import dry_run
from tests import REPO

# The command-line tools' configs (not stages): each file and the module whose FIELDS check it.
TOOLS = {"serve": "alignment.serve", "augment": "alignment.pas.__main__"}
CONFIGS = sorted(p for p in [*(REPO / "configs").glob("*.py"), *(REPO / "configs").glob("synth/*.py")]
                 if p.name != "__init__.py" and p.stem not in TOOLS)
# A stage whose configs are a folder (one per synth recipe): the one the per-stage tests load.
STAGE_CONFIG = {"synth": "synth/constraints"}


def load(name: str) -> ml_collections.ConfigDict:
    return config_lib.load_config_file(str(REPO / "configs" / f"{STAGE_CONFIG.get(name, name)}.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_is_valid_and_dry_runs(path):
    config = config_lib.load_config_file(str(path))
    stages.check(config)
    text = dry_run(config)
    assert f"stage: {config.stage}" in text


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_every_tool_config_is_valid_and_declares_only_its_keys(name):
    config, fields = load(name), importlib.import_module(TOOLS[name]).FIELDS
    config_lib.check_fields(config, fields)
    assert sorted(set(fields) - set(config_lib.flatten_keys(config))) == []


def test_every_declared_field_exists_in_a_config():
    """A FIELDS key no config has would check nothing: a renamed key must be renamed here too."""
    keys = set()
    for path in CONFIGS:
        config = config_lib.load_config_file(str(path))
        keys |= set(config_lib.flatten_keys(config))
        if "warm_start" in config:
            keys |= set(config_lib.flatten_keys(config.warm_start))
    declared = set(stages.COMMON_FIELDS)
    for name in stages.STAGES:
        declared |= set(getattr(stages.stage_module(name), "FIELDS", {}))
    assert sorted(declared - keys) == []


@pytest.mark.parametrize("stage", sorted(stages.STAGES))
def test_a_bad_choice_names_the_key_the_choices_and_the_nearest(stage):
    config = load(stage)
    fields = {**stages.COMMON_FIELDS, **getattr(stages.stage_module(stage), "FIELDS", {})}
    choices = {k: f for k, f in fields.items() if f.choices and k in config_lib.flatten_keys(config)}
    assert choices or stage in ("merge",), "every stage has enumerated fields"
    for key, field in choices.items():
        bad = ml_collections.ConfigDict(config.to_dict())
        first = next(str(c) for c in field.choices if c != "")
        parent, _, leaf = key.rpartition(".")
        (config_lib.lookup(bad, parent) if parent else bad)[leaf] = first + "_"
        with pytest.raises(ValueError) as error:
            stages.check(bad)
        message = str(error.value)
        assert f"config.{key}=" in message and str(list(field.choices)) in message, message
        assert f"Did you mean {first!r}?" in message, message


@pytest.mark.parametrize("stage, key, value, expected", [
    ("grpo", "rl.kl_mode", "k_3", "config.rl.kl_mode='k_3' is not one of ['token_reward', 'k3', 'none']. "
                                   "Did you mean 'k3'?"),
    ("sft", "log_every", 0, "config.log_every=0 must be > 0"),
    ("sft", "data.pack_buffer", 0, "config.data.pack_buffer=0 must be > 0"),
    ("sft", "data.max_length", 0, "config.data.max_length=0 must be > 0"),
    ("dpo", "data.max_length", -5, "config.data.max_length=-5 must be > 0"),
    ("grpo", "rl.prompts_per_step", -2, "config.rl.prompts_per_step=-2 must be > 0"),
    ("sft", "checkpoint.every", -1, "config.checkpoint.every=-1 must be >= 0"),
    ("sft", "optimizer.warmup_steps", -3, "config.optimizer.warmup_steps=-3 must be >= 0"),
    ("sft", "checkpoint.keep", 0, "config.checkpoint.keep=0 must be > 0"),
    ("sft", "model.num_layers", -1, "model config: num_layers must be a positive integer, got -1"),
    ("sft", "model.num_kv_heads", 0, "model config: num_kv_heads must be a positive integer, got 0"),
    ("sft", "optimizer.lr", float("nan"), "config.optimizer.lr=nan must be a number"),
    ("rm", "optimizer.schedule", "cosin", "Did you mean 'cosine'?"),
    ("generate", "sampling.top_p", 1.5, "config.sampling.top_p=1.5 must be > 0 and <= 1"),
    ("merge", "merge.method", "tie", "Did you mean 'ties'?"),
    ("grpo", "warm_start.data.max_length", 0, "config.data.max_length=0 must be > 0"),  # the warm start too
])
def test_bad_values_fail_before_anything_runs(stage, key, value, expected):
    config = load(stage)
    parent, _, leaf = key.rpartition(".")
    (config_lib.lookup(config, parent) if parent else config)[leaf] = value
    with pytest.raises(ValueError) as error:
        stages.check(config)
    assert expected in str(error.value)


@pytest.mark.parametrize("alias, key", [
    ("learning_rate", "optimizer.lr"),
    ("per_device_train_batch_size", "batch_size"),
    ("max_steps", "steps"),
    ("num_generations", "rl.num_samples"),
    ("beta", "rl.beta"),
    ("rl.num_generations", "rl.num_samples"),
    ("max_completion_length", "rl.max_new_tokens"),
])
def test_other_trainers_names_lead_to_the_projects_key(alias, key):
    with pytest.raises(ValueError) as error:
        config_lib.check_override_keys(load("grpo"), [f"--config.{alias}=1"])
    assert f"Did you mean {key!r}?" in str(error.value)


def test_dpo_beta_alias_is_its_own_beta():
    with pytest.raises(ValueError, match="Did you mean 'beta'"):
        config_lib.check_override_keys(load("dpo"), ["--config.optimizer.beta=1"])


def test_a_typo_on_the_command_line_is_one_line_before_anything_compiles(tmp_path):
    out = subprocess.run([sys.executable, "-m", "alignment.launch", "--config=configs/grpo.py",
                          f"--workdir={tmp_path}", "--config.rl.kl_mode=k_3"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: config.rl.kl_mode='k_3'") and "Traceback" not in out.stderr
    assert not any(tmp_path.iterdir())  # nothing was written


def test_run_writes_the_config_and_the_summary(tmp_path, monkeypatch):
    """stages.run is the one writer of config.json and summary.json, whatever the stage returns."""
    config = load("generate")
    config.num_embedded, config.max_new_tokens = 2, 2
    summary = stages.run("generate", config, str(tmp_path))
    assert json.load(open(tmp_path / "summary.json")) == json.loads(json.dumps(summary))
    assert json.load(open(tmp_path / "config.json"))["stage"] == "generate"
    with pytest.raises(ValueError, match="stage 'sft' was given a config for stage 'generate'"):
        stages.run("sft", config, str(tmp_path))


def test_pas_dry_run_has_no_model_but_prints_the_config():
    text = dry_run(load("pas"))
    assert "stage: pas" in text
