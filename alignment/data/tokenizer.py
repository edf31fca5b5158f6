"""One tokenizer interface over SentencePiece `.model` files and Hugging Face `tokenizer.json` files.

`encode` never adds BOS/EOS; chat special tokens written in the text (e.g. "<|im_start|>") map to their single id.
"""
from __future__ import annotations

import functools
import json
import os
import re
from typing import Any, Iterable, Mapping

import sentencepiece as spm
import tokenizers

from alignment.data.tokenizer_files import EMBEDDED, EMBEDDED_PATH


# Names tried, in order, when a tokenizer.json comes without a tokenizer_config.json naming its specials.
_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>")
_EOS_CANDIDATES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]")
_CHAT_SPECIAL = re.compile(r"^<\|[^|]+\|>$")


class Tokenizer:
    """Common interface. Subclasses set `vocab_size`, `bos_id`, `eos_id`, `pad_id` and implement the methods."""

    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int  # the model's pad when it has one, else eos

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as a standalone string (SentencePiece may add its dummy-prefix space)."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`; special tokens are written out unless `skip_special`."""
        raise NotImplementedError

    def token_id(self, piece: str) -> int | None:
        """Id of a single (special) token, None when the vocabulary lacks it."""
        raise NotImplementedError

    @functools.cached_property
    def adds_prefix_space(self) -> bool:
        """True when `encode` prepends a space (SentencePiece dummy prefix, Metaspace, add_prefix_space)."""
        return self.decode(self.encode("a") + self.encode("a")) != "aa"

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of `text` as it tokenizes in the middle of a sequence, i.e. without a dummy-prefix space.

        Chat templates encode segment by segment; a prefix space on every segment would insert spaces that
        the rendered text does not have. For prefix-adding tokenizers a leading space is supplied by the
        prefix itself; otherwise the text is encoded behind a newline anchor, which is then cut off.
        """
        if not self.adds_prefix_space:
            return self.encode(text)
        if text.startswith(" ") and text.strip():
            return self.encode(text[1:])
        anchor = self.encode("\n")
        ids = self.encode("\n" + text)
        if ids[: len(anchor)] != anchor:
            raise ValueError(f"cannot encode {text!r} mid-sequence: the newline anchor merged with the text")
        return ids[len(anchor) :]


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` file; `specials` (bos/eos/pad piece names, None = absent) override its ids."""

    def __init__(self, path: str, specials: Mapping[str, str | None] | None = None):
        self.path = path
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.load(path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"cannot load SentencePiece model {path}: {e}") from e
        self.vocab_size = self._sp.get_piece_size()
        bos, eos, pad = self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()
        self.bos_id, self.eos_id, self.pad_id = (i if i >= 0 else None for i in (bos, eos, pad))
        _apply_specials(self, specials or {}, path)
        if self.eos_id is None:
            raise ValueError(f"SentencePiece model {path} has no eos token")
        if self.pad_id is None:
            self.pad_id = self.eos_id
        # SentencePiece only exposes control-ness; user-defined chat specials follow the <|name|> convention.
        self._special_ids = frozenset(
            i
            for i in range(self.vocab_size)
            if self._sp.is_control(i) or self._sp.is_unknown(i) or _CHAT_SPECIAL.match(self._sp.id_to_piece(i))
        )

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        # sp.decode drops control tokens silently; write them out as their piece so nothing is skipped.
        parts, run = [], []
        for i in (int(i) for i in ids):
            if skip_special and i in self._special_ids:
                continue
            if self._sp.is_control(i):
                parts += [self._sp.decode(run), self._sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        parts.append(self._sp.decode(run))
        return "".join(parts)

    def token_id(self, piece: str) -> int | None:
        i = self._sp.piece_to_id(piece)
        # piece_to_id answers unk for unknown pieces.
        if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i):
            return None
        return i


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`; `specials` (bos/eos/pad token strings, None = absent) name the specials."""

    def __init__(self, path: str, specials: Mapping[str, str | None] | None = None):
        self.path = path
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust loader raises a bare Exception on malformed files
            raise ValueError(f"cannot load tokenizer.json {path}: {e}") from e
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._first_present(_BOS_CANDIDATES)
        self.eos_id = self._first_present(_EOS_CANDIDATES)
        self.pad_id = self._first_present(_PAD_CANDIDATES)
        _apply_specials(self, specials or {}, path)
        if self.eos_id is None:
            raise ValueError(f"{path}: no eos token found; name it as eos_token in tokenizer_config.json")
        if self.pad_id is None:
            self.pad_id = self.eos_id

    def _first_present(self, pieces: Iterable[str]) -> int | None:
        return next((i for i in map(self.token_id, pieces) if i is not None), None)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)


def _apply_specials(tok: Tokenizer, specials: Mapping[str, str | None], path: str) -> None:
    """Set bos/eos/pad ids from token strings named in a config; an explicit None clears bos or pad (pad -> eos)."""
    for name in ("bos", "eos", "pad"):
        if name not in specials:
            continue
        piece = specials[name]
        if piece is None:
            if name == "eos":
                raise ValueError(f"{path}: eos_token must not be null")
            setattr(tok, f"{name}_id", None)
            continue
        i = tok.token_id(piece)
        if i is None:
            raise ValueError(f"{path}: {name}_token {piece!r} is not in the vocabulary")
        setattr(tok, f"{name}_id", i)


def _read_specials(directory: str) -> dict[str, str | None]:
    """bos/eos/pad token strings from special_tokens_map.json, overridden by tokenizer_config.json."""
    specials: dict[str, str | None] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                config: dict[str, Any] = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {path}: {e}") from e
        for key in ("bos", "eos", "pad"):
            if f"{key}_token" in config:
                value = config[f"{key}_token"]
                specials[key] = value["content"] if isinstance(value, dict) else value
    return specials


def _find_in_directory(directory: str) -> str:
    """The tokenizer file in a model directory, preferring tokenizer.json over a SentencePiece model."""
    if os.path.isfile(os.path.join(directory, "tokenizer.json")):
        return os.path.join(directory, "tokenizer.json")
    models = sorted(n for n in os.listdir(directory) if n.endswith(".model"))
    if "tokenizer.model" in models:
        return os.path.join(directory, "tokenizer.model")
    if len(models) == 1:
        return os.path.join(directory, models[0])
    raise FileNotFoundError(
        f"no tokenizer.json or single .model file in directory {directory} (found .model files: {models})"
    )


def load_tokenizer(path: str) -> Tokenizer:
    """Load a tokenizer from a `.model` file, a `tokenizer.json`, a directory holding one, or "embedded"."""
    if path == EMBEDDED:
        path = EMBEDDED_PATH
    specials: dict[str, str | None] = {}
    if os.path.isdir(path):
        specials = _read_specials(path)
        path = _find_in_directory(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    if path.endswith(".json"):
        return HFTokenizer(path, specials)
    if path.endswith(".model"):
        return SentencePieceTokenizer(path, specials)
    raise ValueError(f"unrecognised tokenizer file {path}: expected a SentencePiece .model or a tokenizer.json")


def checked_tokenizer(path: str, model_vocab_size: int) -> Tokenizer:
    """`load_tokenizer(path)`, refused when it has more ids than the model's vocabulary (`model_vocab_size`)."""
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(f"tokenizer {path!r} has {tokenizer.vocab_size} ids but the model's vocab_size is "
                         f"{model_vocab_size}; set model.vocab_size or use the model's own tokenizer")
    return tokenizer
