"""Shared config fields and validation. Stage configs (`configs/<stage>.py`) start from `base_config()`; the
command-line tools (serve, the PAS CLI) read their shipped configs through `run_command_line`."""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import logging
import math
import numbers
import os
import pathlib
import sys
from typing import Callable, Iterable, Mapping, Sequence

import ml_collections

def base_config() -> ml_collections.ConfigDict:
    """Fields every training stage has. One commented line per field."""
    c = ml_collections.ConfigDict()
    c.stage = ""  # which stage runs: one of alignment.stages.STAGES
    c.seed = 0  # model init, data order and sampling
    c.model = ml_collections.ConfigDict()  # ModelConfig fields (see configs/models/)
    c.init_from = ""  # '' (random init), a HF directory (config.json + safetensors) or an Orbax checkpoint
    c.tokenizer = ""  # 'embedded', a SentencePiece .model, a tokenizer.json or a directory; '' = init_from's, else embedded
    c.chat_template = ""  # llama2 | llama3 | chatml; '' = the one init_from was trained with, else chatml
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
    c.lora = ml_collections.ConfigDict(dict(
        enabled=False,  # train low-rank adapters on a frozen base instead of every weight (models/lora.py)
        targets=r"layers/(q|k|v|o|gate|up|down)_proj",  # regex searched in kernel paths: which projections adapt
        rank=8,  # adapter rank r
        alpha=16.0,  # the adapter's output is scaled by alpha / r (alpha / sqrt(r) with rslora)
        dropout=0.0,  # dropout on the adapters' input, in [0, 0.9]
        rslora=False,  # rank-stabilised scaling alpha / sqrt(r)
        quantize="none",  # QLoRA: the frozen projection kernels stored as none | int8 | nf4
        block_size=64,  # nf4: elements per absmax block (even)
    ))
    c.peak_tflops_per_device = 0.0  # for MFU; 0 = the accelerator's known bf16 figure, else measured in model.dtype
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


# Names users bring from TRL / Hugging Face Trainer / MaxText, and this project's key for each (the first one
# that the config at hand has).
ALIASES: dict[str, tuple[str, ...]] = {
    "learning_rate": ("optimizer.lr",),
    "lr": ("optimizer.lr",),
    "lr_scheduler_type": ("optimizer.schedule",),
    "warmup_steps": ("optimizer.warmup_steps",),
    "weight_decay": ("optimizer.weight_decay",),
    "max_grad_norm": ("optimizer.clip_norm",),
    "gradient_clipping_threshold": ("optimizer.clip_norm",),
    "adam_beta1": ("optimizer.b1",),
    "adam_beta2": ("optimizer.b2",),
    "adam_epsilon": ("optimizer.eps",),
    "per_device_train_batch_size": ("batch_size",),
    "per_device_batch_size": ("batch_size",),
    "train_batch_size": ("batch_size",),
    "global_batch_size": ("batch_size",),
    "gradient_accumulation_steps": ("micro_batches",),
    "max_steps": ("steps",),
    "num_train_steps": ("steps",),
    "logging_steps": ("log_every",),
    "log_period": ("log_every",),
    "eval_steps": ("eval_every", "rl.eval_every"),
    "eval_interval": ("eval_every", "rl.eval_every"),
    "save_steps": ("checkpoint.every",),
    "checkpoint_period": ("checkpoint.every",),
    "save_total_limit": ("checkpoint.keep",),
    "model_name_or_path": ("init_from",),
    "load_parameters_path": ("init_from",),
    "tokenizer_path": ("tokenizer",),
    "max_length": ("data.max_length",),
    "max_seq_length": ("data.max_length",),
    "max_target_length": ("data.max_length",),
    "packing": ("data.packing",),
    "num_generations": ("rl.num_samples",),
    "beta": ("rl.beta", "beta"),
    "epsilon": ("rl.clip_low",),
    "epsilon_high": ("rl.clip_high",),
    "num_iterations": ("rl.ppo_epochs",),
    "max_prompt_length": ("rl.max_prompt_length",),
    "max_completion_length": ("rl.max_new_tokens", "max_new_tokens"),
    "max_new_tokens": ("rl.max_new_tokens", "max_new_tokens"),
    "temperature": ("rl.temperature", "sampling.temperature", "generation.temperature"),
    "loss_type": ("rl.aggregation", "loss"),
    "scale_rewards": ("rl.scale_rewards",),
    "ici_fsdp_parallelism": ("mesh.fsdp",),
    "ici_tensor_parallelism": ("mesh.tensor",),
    "ici_data_parallelism": ("mesh.data",),
    "gradient_checkpointing": ("model.remat_policy",),
    "remat_policy": ("model.remat_policy",),
    "dtype": ("model.dtype",),
    "scan_layers": ("model.scan_layers",),
    "attention": ("model.attention_impl",),
    "output_dir": (),  # a flag, not a config key: --workdir
    "base_output_directory": (),
}


def nearest_key(key: str, valid: Iterable[str]) -> str:
    """' Did you mean X?' for a key a config does not have: a known alias of another trainer first, then the
    spelling nearest to the key or to its last part."""
    valid = list(valid)
    last = key.rsplit(".", 1)[-1]
    for alias in (key, last):
        if alias in ALIASES:
            targets = [t for t in ALIASES[alias] if t in valid]
            if targets:
                return f" Did you mean {targets[0]!r}? ({alias!r} is another trainer's name for it)"
            if not ALIASES[alias]:
                return f" {alias!r} is a command-line flag here: --workdir"
    hint = suggest(key, valid)
    if hint:
        return hint
    ends = [v for v in valid if v.rsplit(".", 1)[-1] == last]
    return f" Did you mean {ends[0]!r}?" if ends else ""


def check_override_keys(config: ml_collections.ConfigDict, argv: list[str], flag: str = "config") -> None:
    """Raise ValueError for a `--config.a.b=v` override naming a key the config does not have."""
    valid = flatten_keys(config)
    prefix = f"--{flag}."
    for arg in argv:
        if not arg.startswith(prefix):
            continue
        key = arg[len(prefix):].split("=", 1)[0]
        if key not in valid:
            raise ValueError(f"unknown config key {key!r}.{nearest_key(key, valid)}")


@dataclasses.dataclass(frozen=True)
class Field:
    """The values one config key accepts: one of `choices`, or a number in [low, high] (`open_low` excludes
    low), an integer where `integer`. Declared once, next to the code that reads the key."""

    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    integer: bool = False

    def check(self, key: str, value) -> None:
        if self.choices:
            if value not in self.choices:
                hint = suggest(str(value), [str(c) for c in self.choices])
                raise ValueError(f"config.{key}={value!r} is not one of {list(self.choices)}.{hint}")
            return
        kind = "an integer" if self.integer else "a number"
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or (
                self.integer and not isinstance(value, numbers.Integral)) or not math.isfinite(value):
            raise ValueError(f"config.{key}={value!r} must be {kind}")
        too_low = self.low is not None and (value <= self.low if self.open_low else value < self.low)
        if too_low or (self.high is not None and value > self.high):
            low = "" if self.low is None else f"{'>' if self.open_low else '>='} {self.low}"
            high = "" if self.high is None else f"<= {self.high}"
            raise ValueError(f"config.{key}={value!r} must be {' and '.join(b for b in (low, high) if b)}")


def one_of(*choices) -> Field:
    return Field(choices=tuple(choices))


def positive(integer: bool = True) -> Field:
    return Field(low=0, open_low=True, integer=integer)


def at_least(low: float, integer: bool = True) -> Field:
    return Field(low=low, integer=integer)


def in_range(low: float, high: float) -> Field:
    return Field(low=low, high=high)


def lookup(config: ml_collections.ConfigDict, key: str):
    """The value at dotted `key`, or KeyError."""
    node = config
    for part in key.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, Mapping)) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def check_fields(config: ml_collections.ConfigDict, fields: Mapping[str, Field]) -> None:
    """Check every key of `fields` the config has (keys it lacks belong to other stages)."""
    for key, field in fields.items():
        try:
            value = lookup(config, key)
        except KeyError:
            continue
        field.check(key, value)


CONFIGS_PACKAGE = "alignment_configs"  # the repository's configs/ folder, as setup.py installs it

# What it means when a config file cannot find one of these packages.
IMPORT_HINTS = {
    CONFIGS_PACKAGE: " (the shipped configs are installed with the package: pip install -e . in the repository root)",
    "configs": f" (the shipped configs are imported as {CONFIGS_PACKAGE}: from {CONFIGS_PACKAGE} import sft)",
}


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Run a config file's `get_config()` (the ml_collections config-file idiom)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        hint = IMPORT_HINTS.get(e.name, "") if isinstance(e, ModuleNotFoundError) else ""
        raise ValueError(f"{path}: {e}{hint}") from e
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path}: a config file must define get_config()")
    return module.get_config()


def configs_folder() -> str:
    """The installed configs folder: the repository's configs/ in an editable install, its copy in site-packages
    in a plain one. Found without running any config."""
    spec = importlib.util.find_spec(CONFIGS_PACKAGE)
    # A namespace package's path; an editable install adds an entry that is no directory (its finder's hook).
    folders = [p for p in (spec.submodule_search_locations or []) if os.path.isdir(p)] if spec else []
    if not folders:
        raise FileNotFoundError(f"the shipped configs ({CONFIGS_PACKAGE}) are not installed: "
                                "run pip install -e . in the repository root")
    return folders[0]


def shipped_configs() -> list[str]:
    """Every shipped config's name, its path in the configs folder without .py: 'grpo', ..., 'models/tiny'."""
    root = pathlib.Path(configs_folder())
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.py")
                  if not p.name.startswith("_"))


def config_path(name: str) -> str:
    """The file of a shipped config inside the installed package: config_path("grpo") -> .../grpo.py,
    config_path("models/tiny") -> .../models/tiny.py. Only shipped names are accepted (no path escapes)."""
    names = shipped_configs()
    if name not in names:
        raise ValueError(f"no shipped config {name!r}.{suggest(name, names)} Shipped: {names}")
    return os.path.join(configs_folder(), *name.split("/")) + ".py"


def model_preset(name: str) -> ml_collections.ConfigDict:
    """A named model size: the config `models/<name>` of the installed configs (alignment_configs.models)."""
    presets = [n.removeprefix("models/") for n in shipped_configs() if n.startswith("models/")]
    if name not in presets:
        raise ValueError(f"unknown model preset {name!r}.{suggest(name, presets)} Available: {presets}")
    return load_config_file(config_path(f"models/{name}"))


def check_same_keys(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict, path: str) -> None:
    """ValueError when the config file at `path` has a key `reference` (the shipped config) lacks, or lacks one."""
    keys, valid = flatten_keys(config), flatten_keys(reference)
    unknown = [key for key in keys if key not in valid]
    if unknown:
        raise ValueError(f"{path}: unknown config key {unknown[0]!r}.{nearest_key(unknown[0], valid)}")
    missing = [key for key in valid if key not in keys]
    if missing:
        raise ValueError(f"{path}: the config lacks key {missing[0]!r}")


def configure_logging(argv: Sequence[str], show: Sequence[str] = ("alignment",)) -> None:
    """What a command-line user reads on stderr: INFO of the `show` loggers, warnings and errors of everything.
    With -v/--verbosity, INFO of the whole project and of the libraries (absl, Orbax, JAX) too."""
    from absl import logging as absl_logging  # here: config files import this module, and need no absl set-up

    verbose = any(arg.startswith(("--verbosity", "-v")) for arg in argv[1:])
    if not verbose:
        absl_logging.set_verbosity(absl_logging.WARNING)  # app.run would raise it to INFO
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    project = logging.getLogger("alignment")
    project.handlers[:] = [handler]
    project.setLevel(logging.INFO if verbose else logging.WARNING)
    project.propagate = False
    for name in show:
        logging.getLogger(name).setLevel(logging.INFO)


def _config_file_argument(argv: Sequence[str]) -> str | None:
    """The last `--config=PATH` (or `--config PATH`) of argv, None without one."""
    path = None
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
    return path


def run_command_line(main: Callable[[ml_collections.ConfigDict], None], name: str, show: Sequence[str] = (),
                     errors: tuple[type[Exception], ...] = ()) -> None:
    """Run `main(config)` as the command-line tool of the shipped config `name`: `--config=FILE` (default: the
    shipped file) and `--config.key=value` overrides, both checked key by key before anything runs; logs as
    `configure_logging(argv, show)` says. A bad key or value, and a ValueError, FileNotFoundError or one of
    `errors` raised by `main` (they name their key, file or URL), end the process with one line `error: ...`
    on stderr, no traceback."""
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None, f"Config file; default: the shipped {name} config")

    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:  # a value of the wrong type, an unknown flag
            old = getattr(e, "flagname", None) in keys
            raise ValueError(f"{e}{f' (settings are --config.{e.flagname}=...)' if old else ''}") from None

    def run_main(rest):
        if len(rest) > 1:
            raise ValueError(f"unexpected arguments {rest[1:]}: settings are --config.key=value")
        main(config_flag.value)

    try:
        shipped = config_path(name)
        argv, path = list(sys.argv), _config_file_argument(sys.argv[1:])
        if path is None:
            argv.insert(1, f"--config={shipped}")  # before the overrides, which need the config to exist
            path = shipped
        config = load_config_file(path)
        check_same_keys(config, load_config_file(shipped), path)
        check_override_keys(config, argv)
        keys = flatten_keys(config)
        configure_logging(argv, show)
        app.run(run_main, argv=argv, flags_parser=parse)
    except (ValueError, FileNotFoundError, *errors) as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:  # Ctrl-C: the user knows, no traceback
        raise SystemExit(130) from None
