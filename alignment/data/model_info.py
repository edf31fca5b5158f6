"""What a checkpoint directory says about its model, and the settings a run takes from it.

A training stage describes its checkpoints before the first step (`describe`): `<checkpoints>/model.json` holds the
model config, the tokenizer (its files copied to `<checkpoints>/tokenizer/`, or 'embedded'), the chat template and
the stage. Whatever starts from a checkpoint reads that back (`resolve`): a config whose `tokenizer` or
`chat_template` is '' takes the checkpoint's, so a user passes only the directory; an explicit value that
contradicts the checkpoint is an error naming both. A Hugging Face directory brings its own tokenizer files, and
its chat template is recognised from its special tokens.
"""
from __future__ import annotations

import dataclasses
import os

import ml_collections

from alignment.checkpoint import checkpoint_directory, read_model_info, write_model_info
from alignment.data import tokenizer_files
from alignment.data.chat import TEMPLATES
from alignment.models.config import ModelConfig
from alignment.train.runtime import is_hf_checkpoint

DEFAULT_TOKENIZER = tokenizer_files.EMBEDDED
DEFAULT_TEMPLATE = "chatml"
TOKENIZER_DIR = "tokenizer"
# A special token that only one template's tokenizers have -> that template (for HF directories).
_TEMPLATE_MARKERS = (("<|start_header_id|>", "llama3"), ("<|im_start|>", "chatml"))


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """A checkpoint directory's description (model.json), with `tokenizer` a path one can load (or 'embedded')."""

    stage: str
    model: dict  # ModelConfig fields
    tokenizer: str
    tokenizer_fingerprint: str
    chat_template: str
    max_length: int = 0  # tokens per training sequence (data.max_length), 0 where the stage has none


def read(path: str) -> ModelInfo | None:
    """The description of a checkpoint directory (its root or a step directory), or None where it has none."""
    found = read_model_info(path)
    if found is None:
        return None
    info, directory = found
    fields = [f.name for f in dataclasses.fields(ModelInfo)]
    missing = sorted(set(fields) - set(info) - {"max_length"})
    if missing:
        raise ValueError(f"{os.path.join(directory, 'model.json')}: missing field(s) {missing}")
    if info["tokenizer"] != DEFAULT_TOKENIZER:
        info["tokenizer"] = os.path.join(directory, info["tokenizer"])
    return ModelInfo(**{k: info[k] for k in fields if k in info})


def describe(directory: str, *, model: ModelConfig, tokenizer: str, chat_template: str, stage: str,
             max_length: int = 0) -> None:
    """Write `directory`/model.json, and copy the tokenizer's files into `directory`/tokenizer/."""
    stored = tokenizer
    if tokenizer != DEFAULT_TOKENIZER:
        target = os.path.join(directory, TOKENIZER_DIR)
        if os.path.abspath(tokenizer) != os.path.abspath(target):
            tokenizer_files.copy_tokenizer(tokenizer, target)
        stored = TOKENIZER_DIR
    write_model_info(directory, {"stage": stage, "model": dataclasses.asdict(model), "tokenizer": stored,
                                 "tokenizer_fingerprint": tokenizer_files.fingerprint(tokenizer),
                                 "chat_template": chat_template, "max_length": max_length})


def _hf_template(directory: str) -> str:
    """The template an HF tokenizer's special tokens belong to, else the default."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            for marker, template in _TEMPLATE_MARKERS:
                if marker in text:
                    return template
    return DEFAULT_TEMPLATE


def resolve(config: ml_collections.ConfigDict) -> None:
    """Fill an empty `config.tokenizer` / `config.chat_template` from the checkpoint `config.init_from` names (or
    the defaults: the embedded tokenizer, chatml); refuse explicit values that contradict its model.json. A run's
    workdir given as init_from becomes its checkpoints directory."""
    if config.get("init_from"):
        config.init_from = checkpoint_directory(config.init_from)
    source = config.get("init_from", "")
    info = read(source) if source else None
    hf = bool(source) and info is None and is_hf_checkpoint(source)
    own_tokenizer = info.tokenizer if info else None
    if hf:
        try:
            tokenizer_files.tokenizer_files(source)
            own_tokenizer = source
        except ValueError:  # weights without tokenizer files: config.tokenizer must name one
            pass
    if not config.tokenizer:
        config.tokenizer = own_tokenizer or DEFAULT_TOKENIZER
    elif info and tokenizer_files.fingerprint(config.tokenizer) != info.tokenizer_fingerprint:
        raise ValueError(f"config.tokenizer={config.tokenizer!r} is not the tokenizer of checkpoint {source} "
                         f"({info.tokenizer!r}); leave config.tokenizer empty to use the checkpoint's")
    if "chat_template" not in config:  # configs that render no chats (an embedder's)
        return
    own_template = info.chat_template if info else (_hf_template(source) if hf else None)
    if not config.chat_template:
        config.chat_template = own_template or DEFAULT_TEMPLATE
    elif info and config.chat_template != info.chat_template:
        raise ValueError(f"config.chat_template={config.chat_template!r} is not the template checkpoint {source} "
                         f"was trained with ({info.chat_template!r}); leave config.chat_template empty to use it")
    if config.chat_template not in TEMPLATES:
        raise ValueError(f"config.chat_template={config.chat_template!r} is not one of {list(TEMPLATES)}")
