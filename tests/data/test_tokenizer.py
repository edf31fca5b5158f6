"""Tokenizer loading, round trips and special tokens for SentencePiece and Hugging Face tokenizers."""
import json
from pathlib import Path

import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from alignment.data.build_tiny_tokenizer import CHAT_SPECIAL_TOKENS, build_corpus, train_model
from alignment.data.tokenizer import (EMBEDDED_PATH, HFTokenizer, SentencePieceTokenizer, checked_tokenizer,
                                      load_tokenizer)
from tests import REPO

LLAMA2_MODEL = REPO.parent / "shared" / "data" / "tokenizers" / "llama2" / "tokenizer.model"


@pytest.fixture(scope="module")
def tiny():
    return load_tokenizer("embedded")


def test_embedded_ids(tiny):
    assert isinstance(tiny, SentencePieceTokenizer)
    assert (tiny.vocab_size, tiny.bos_id, tiny.eos_id, tiny.pad_id) == (1024, 1, 2, 3)
    assert not tiny.adds_prefix_space


def test_embedded_asset_matches_build_script():
    # The shipped binary must be exactly what the deterministic build script produces.
    assert train_model(build_corpus()) == Path(EMBEDDED_PATH).read_bytes()


@pytest.mark.parametrize(
    "text",
    ["What is (12 + 7) * 3? The answer is 57.", "  leading spaces\n\nand newlines  ", "héllo wörld, 世界 🙂 ß"],
)
def test_embedded_round_trip(tiny, text):
    ids = tiny.encode(text)
    assert tiny.bos_id not in ids and tiny.eos_id not in ids
    assert tiny.decode(ids) == text


def test_digits_are_split(tiny):
    assert [tiny.decode([i]) for i in tiny.encode("90210")] == list("90210")


@pytest.mark.parametrize("token", CHAT_SPECIAL_TOKENS)
def test_special_tokens_are_single_ids(tiny, token):
    tid = tiny.token_id(token)
    assert tid is not None
    assert tiny.encode(token) == [tid]
    ids = tiny.encode(f"hi{token}there")
    assert ids.count(tid) == 1
    assert tiny.decode(ids) == f"hi{token}there"
    assert tiny.decode(ids, skip_special=True) == "hithere"


def test_decode_writes_control_tokens_unless_skipped(tiny):
    ids = [tiny.bos_id, *tiny.encode("hi"), tiny.eos_id]
    assert tiny.decode(ids) == "<s>hi</s>"
    assert tiny.decode(ids, skip_special=True) == "hi"


def test_token_id_absent(tiny):
    assert tiny.token_id("<|not_a_token|>") is None
    assert tiny.token_id("<unk>") == 0


def _train_hf_tokenizer(path: Path, specials: list[str]) -> None:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    sentences = ["The quick brown fox jumps over the lazy dog.", "What is 12 + 7? The answer is 19."] * 10
    tok.train_from_iterator(sentences, trainer)
    tok.save(str(path))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    _train_hf_tokenizer(directory / "tokenizer.json", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return directory


def test_hf_file_defaults(hf_dir):
    tok = load_tokenizer(str(hf_dir / "tokenizer.json"))
    assert isinstance(tok, HFTokenizer)
    assert tok.bos_id is None
    assert tok.eos_id == tok.pad_id == tok.token_id("<|endoftext|>")
    assert tok.vocab_size == 300


def test_hf_round_trip_and_specials(hf_dir):
    tok = load_tokenizer(str(hf_dir / "tokenizer.json"))
    text = "<|im_start|>user\nWhat is 12 + 7? héllo<|im_end|>"
    ids = tok.encode(text)
    assert ids[0] == tok.token_id("<|im_start|>") and ids[-1] == tok.token_id("<|im_end|>")
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=True) == "user\nWhat is 12 + 7? héllo"
    assert tok.token_id("<|missing|>") is None
    assert not tok.adds_prefix_space


def test_hf_directory_reads_config(hf_dir, tmp_path):
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "tokenizer.json").write_text((hf_dir / "tokenizer.json").read_text())
    (directory / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    config = {"bos_token": None, "eos_token": {"content": "<|im_end|>"}, "pad_token": "<|endoftext|>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(str(directory))
    assert isinstance(tok, HFTokenizer)
    assert tok.bos_id is None
    assert tok.eos_id == tok.token_id("<|im_end|>")
    assert tok.pad_id == tok.token_id("<|endoftext|>")


def test_directory_prefers_tokenizer_json(hf_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_text((hf_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer.model").write_bytes(Path(EMBEDDED_PATH).read_bytes())
    assert isinstance(load_tokenizer(str(tmp_path)), HFTokenizer)
    (tmp_path / "tokenizer.json").unlink()
    assert isinstance(load_tokenizer(str(tmp_path)), SentencePieceTokenizer)


def test_config_token_not_in_vocab(hf_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_text((hf_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match="eos_token '</s>' is not in the vocabulary"):
        load_tokenizer(str(tmp_path))


def test_missing_paths(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer(str(missing))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_checked_tokenizer_refuses_more_ids_than_the_model_has():
    assert checked_tokenizer("embedded", 1024).vocab_size == 1024  # the embedded tokenizer fits the tiny model
    with pytest.raises(ValueError, match="tokenizer 'embedded' has 1024 ids but the model's vocab_size is 1000"):
        checked_tokenizer("embedded", 1000)


@pytest.mark.parametrize("name", ["broken.model", "tokenizer.json", "vocab.txt"])
def test_unreadable_files(tmp_path, name):
    path = tmp_path / name
    path.write_text("not a tokenizer")
    with pytest.raises(ValueError, match=name):
        load_tokenizer(str(path))


@pytest.mark.skipif(not LLAMA2_MODEL.exists(), reason=f"Llama-2 tokenizer not present at {LLAMA2_MODEL}")
def test_llama2_tokenizer():
    tok = load_tokenizer(str(LLAMA2_MODEL))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    assert tok.pad_id == tok.eos_id  # Llama-2 has no pad token
    assert tok.adds_prefix_space
    reference = spm.SentencePieceProcessor(model_file=str(LLAMA2_MODEL))
    assert tok.encode("Hello world") == reference.encode("Hello world")
    assert tok.decode(tok.encode("Hello world")) == "Hello world"
