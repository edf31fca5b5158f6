"""A checkpoint directory carries what is needed to use it (model.json + the tokenizer's files), and whatever starts
from it takes its tokenizer and chat template unless told otherwise; a contradicting explicit value is an error."""
import json
import shutil

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from alignment import stages
from alignment.checkpoint import checkpoint_directory
from alignment.config import load_config_file
from alignment.data import model_info, tokenizer_files
from alignment.generation.loading import checkpoint_config, load

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """Two SFT steps with the llama2 template and a copy of the embedded tokenizer given by path."""
    root = tmp_path_factory.mktemp("sft")
    shutil.copy(tokenizer_files.EMBEDDED_PATH, root / "tok.model")
    config = load_config_file("configs/sft.py")
    config.model.update(TINY)
    config.update(steps=2, batch_size=8, log_every=1, eval_every=0, tokenizer=str(root / "tok.model"),
                  chat_template="llama2")
    config.data.update(num_embedded=16, num_embedded_eval=8, max_length=48)
    config.checkpoint.async_save = False
    stages.run("sft", config, str(root / "run"))
    return root


def test_training_writes_model_json_and_a_copy_of_the_tokenizer(sft_run):
    info = json.load(open(sft_run / "run" / "checkpoints" / "model.json"))
    assert info["stage"] == "sft" and info["chat_template"] == "llama2" and info["max_length"] == 48
    assert info["model"]["hidden_size"] == 32 and info["tokenizer"] == "tokenizer"
    assert (sft_run / "run" / "checkpoints" / "tokenizer" / "tok.model").read_bytes() == \
        (sft_run / "tok.model").read_bytes()
    for where in ("run", "run/checkpoints", "run/checkpoints/2"):  # a workdir, its checkpoints, one step
        read = model_info.read(checkpoint_directory(str(sft_run / where)))
        assert read.chat_template == "llama2" and read.tokenizer.endswith("checkpoints/tokenizer")


def test_a_directory_is_all_generation_needs(sft_run, tmp_path):
    config = load_config_file("configs/generate.py")
    config.update(init_from=str(sft_run / "run"), num_embedded=2, max_new_tokens=4)
    summary = stages.run("generate", config, str(tmp_path))
    used = json.load(open(tmp_path / "config.json"))
    assert used["chat_template"] == "llama2" and used["tokenizer"].endswith("checkpoints/tokenizer")
    assert used["init_from"].endswith("run/checkpoints") and summary["completions"] == 2
    loaded = load(checkpoint_config(str(sft_run / "run")))
    assert loaded.config.hidden_size == 32 and loaded.chat_template == "llama2" and loaded.max_length == 48


def _other_tokenizer(directory):
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["a few words to learn from"], trainer)
    hf.save(str(directory / "tokenizer.json"))
    return str(directory)


def test_explicit_values_that_contradict_the_checkpoint_are_errors(sft_run, tmp_path):
    def resolved(**fields):
        config = load_config_file("configs/generate.py")
        config.update(init_from=str(sft_run / "run"), **fields)
        model_info.resolve(config)
        return config

    same = resolved(tokenizer="embedded", chat_template="llama2")  # the same tokenizer by content
    assert same.tokenizer == "embedded"
    with pytest.raises(ValueError, match=r"config.chat_template='chatml' is not the template checkpoint .* was "
                                         r"trained with \('llama2'\)"):
        resolved(chat_template="chatml")
    with pytest.raises(ValueError, match=r"config.tokenizer='.*' is not the tokenizer of checkpoint"):
        resolved(tokenizer=_other_tokenizer(tmp_path))


def test_hf_directories_bring_their_tokenizer_and_template(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    _other_tokenizer(tmp_path)
    config = load_config_file("configs/generate.py")
    config.init_from = str(tmp_path)
    model_info.resolve(config)
    assert config.tokenizer == str(tmp_path) and config.chat_template == "chatml"  # <|im_start|> in its vocabulary
    assert model_info.read(str(tmp_path)) is None
