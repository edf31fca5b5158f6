"""A tokenizer's files: which they are, copying them, and telling two tokenizers apart by content.

Standard library only, so the merge's light import path can use it.
"""
from __future__ import annotations

import hashlib
import os
import shutil

EMBEDDED = "embedded"  # the name of the tokenizer shipped with the package, at EMBEDDED_PATH
EMBEDDED_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tiny.model")
# What a Hugging Face tokenizer (and the generation defaults beside it) is stored in; a SentencePiece tokenizer is
# one `.model` file.
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


def tokenizer_files(source: str) -> list[str]:
    """Paths of the tokenizer files of `source`: 'embedded', a tokenizer file, or a directory (weights beside them
    ignored)."""
    if source == EMBEDDED:
        return [EMBEDDED_PATH]
    if os.path.isfile(source):
        return [source]
    if not os.path.isdir(source):
        raise FileNotFoundError(f"tokenizer not found: {source}")
    files = [os.path.join(source, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(source, n))]
    files += [os.path.join(source, n) for n in sorted(os.listdir(source))
              if n.endswith(".model") and os.path.join(source, n) not in files]
    if not files:
        raise ValueError(f"{source} holds no tokenizer files (any of {TOKENIZER_FILES} or a .model file)")
    return files


def copy_tokenizer(source: str, directory: str) -> list[str]:
    """Copy the tokenizer files of `source` into `directory` (created); returns their names."""
    os.makedirs(directory, exist_ok=True)
    names = []
    for path in tokenizer_files(source):
        shutil.copyfile(path, os.path.join(directory, os.path.basename(path)))
        names.append(os.path.basename(path))
    return names


def fingerprint(source: str) -> str:
    """A digest of the tokenizer's file contents (names aside, so a copy has the fingerprint of its original)."""
    digest = hashlib.sha256()
    for path in tokenizer_files(source):
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]
