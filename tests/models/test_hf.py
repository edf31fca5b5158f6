"""HF safetensors import/export: logits parity with transformers, sharding, round trips, bad input."""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from alignment.models import hf
from alignment.models.config import ModelConfig, from_hf_config
from alignment.models.hf import load_hf_checkpoint, save_hf_checkpoint
from alignment.models.transformer import Transformer, rope_inverse_frequencies

try:
    import torch
    import transformers
except ImportError:  # the parity tests need them; the rest of the file does not
    torch = transformers = None

needs_hf = pytest.mark.skipif(transformers is None, reason="transformers/torch cannot be imported")

BATCH, SEQ = 2, 16
LLAMA_GQA = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
# original_max_position_embeddings=16 puts this head_dim's wavelengths in all three llama3 bands.
LLAMA31 = dict(LLAMA_GQA, num_hidden_layers=3, rope_theta=500000.0,
               rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=16))
# 4,096 positions, most past original_max_position_embeddings, with weights large enough (logits up to ~6) that
# one ulp in an inverse frequency shows in the logits by the last positions.
LLAMA31_LONG = dict(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, max_position_embeddings=4096, rms_norm_eps=1e-5, initializer_range=0.15,
                    rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                           high_freq_factor=4.0, original_max_position_embeddings=512))
QWEN2_TIED = dict(vocab_size=192, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=True)


def _hf_model(kind: str, hf_kwargs: dict):
    """A seeded random HF model; norms and biases are randomised too, since they init to ones/zeros."""
    torch.manual_seed(0)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    model = model_cls(config_cls(**hf_kwargs, attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.5)
    return model


def _save_hf(tmp_path_factory, kind: str, hf_kwargs: dict, **save_kwargs) -> tuple[object, str]:
    model = _hf_model(kind, hf_kwargs)
    path = str(tmp_path_factory.mktemp(kind))
    model.save_pretrained(path, **save_kwargs)
    return model, path


def _inputs(vocab: int, offset: int = 0, pad: int = 0):
    """tokens, positions, segment_ids [batch, seq]; the last `pad` positions of row 1 are padding."""
    tokens = np.random.default_rng(1).integers(0, vocab, (BATCH, SEQ), dtype=np.int32)
    positions = np.broadcast_to(np.arange(SEQ, dtype=np.int32) + offset, (BATCH, SEQ)).copy()
    segment_ids = np.ones((BATCH, SEQ), np.int32)
    segment_ids[1, SEQ - pad:] = 0
    return tokens, positions, segment_ids


def _hf_logits(model, tokens, positions, segment_ids) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(segment_ids, dtype=torch.long),
                    position_ids=torch.tensor(positions, dtype=torch.long))
    return out.logits.float().numpy()


def _project_logits(config: ModelConfig, params, tokens, positions, segment_ids) -> np.ndarray:
    model = Transformer(config)
    hidden = model.apply({"params": params}, tokens, positions, segment_ids)
    return np.asarray(model.apply({"params": params}, hidden, method="logits"))


def _assert_trees_equal(a, b):
    """Same structure, dtypes and exact values."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _save_hf(tmp_path_factory, "llama", LLAMA_GQA)


@pytest.fixture(scope="module")
def small_config():
    return ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def random_params(small_config):
    """Random project params with non-trivial norms (float32, numpy)."""
    params = jax.tree.map(np.asarray, Transformer(small_config).init(jax.random.key(0), *_inputs(96))["params"])
    params = flax.linen.meta.unbox(params)
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(0)
    return jax.tree.unflatten(tree, [rng.normal(size=x.shape).astype(np.float32) for x in leaves])


# ----------------------------------------------------------------------------- parity with transformers


@needs_hf
@pytest.mark.parametrize("kind,hf_kwargs,offset", [
    ("llama", LLAMA_GQA, 0),
    ("llama", LLAMA31, 48),  # positions 48..63, beyond original_max_position_embeddings
    ("qwen2", QWEN2_TIED, 0),
], ids=["llama_gqa", "llama31_rope", "qwen2_tied_bias"])
def test_logits_match_transformers(tmp_path_factory, kind, hf_kwargs, offset):
    model, path = _save_hf(tmp_path_factory, kind, hf_kwargs)
    config, params = load_hf_checkpoint(path)
    assert config.num_kv_heads < config.num_heads
    if kind == "qwen2":
        header, _ = hf._read_header(os.path.join(path, "model.safetensors"))
        assert config.qkv_bias and config.tie_embeddings and "lm_head.weight" not in header
    if "rope_scaling" in hf_kwargs:
        unscaled = rope_inverse_frequencies(dataclasses.replace(config, rope_scaling=None))
        assert not np.allclose(rope_inverse_frequencies(config), unscaled)
    inputs = _inputs(config.vocab_size, offset=offset)
    diff = np.abs(_project_logits(config, params, *inputs) - _hf_logits(model, *inputs)).max()
    assert diff < 1e-4, diff


@needs_hf
@pytest.mark.parametrize("rope", [
    dict(rope_theta=10000.0),
    dict(rope_theta=10000.0, rope_scaling=dict(rope_type="linear", factor=4.0)),
    dict(rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                high_freq_factor=4.0, original_max_position_embeddings=8192)),
], ids=["default", "linear", "llama3"])
def test_rope_inverse_frequencies_are_transformers_bits(rope):
    """Llama-3.1 8B's head_dim and RoPE (and the older schemes): the same float32 values, bit for bit."""
    hf_config = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=16384, **rope)
    expected = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_config).inv_freq.numpy()
    got = rope_inverse_frequencies(from_hf_config(hf_config.to_dict()))
    assert got.dtype == np.float32 and np.array_equal(got, expected)


@needs_hf
def test_long_context_logits_match_transformers(tmp_path_factory):
    """Compiled forward (where the frequencies are built) at 4,096 positions with llama3 scaling, float32."""
    model, path = _save_hf(tmp_path_factory, "llama", LLAMA31_LONG)
    config, params = load_hf_checkpoint(path)
    seq = 4096
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (1, seq), dtype=np.int32)
    positions, segment_ids = np.arange(seq, dtype=np.int32)[None], np.ones((1, seq), np.int32)
    transformer = Transformer(config)
    logits = jax.jit(lambda p, *inputs: transformer.apply({"params": p}, transformer.apply({"params": p}, *inputs),
                                                          method="logits"))
    ours = np.asarray(logits(params, tokens, positions, segment_ids))
    diff = np.abs(ours - _hf_logits(model, tokens, positions, segment_ids)).max()
    assert diff < 2e-5, diff


@needs_hf
def test_padded_batch_matches_attention_mask(llama):
    model, path = llama
    config, params = load_hf_checkpoint(path)
    inputs = _inputs(config.vocab_size, pad=5)
    real = inputs[2].astype(bool)
    ours, theirs = _project_logits(config, params, *inputs), _hf_logits(model, *inputs)
    assert np.abs(ours[real] - theirs[real]).max() < 1e-4


@needs_hf
def test_sharded_import_matches_single_file(tmp_path_factory, llama):
    _, single = llama
    _, sharded = _save_hf(tmp_path_factory, "llama", LLAMA_GQA, max_shard_size="50KB")
    with open(os.path.join(sharded, hf.INDEX_FILE)) as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1
    _assert_trees_equal(load_hf_checkpoint(single)[1], load_hf_checkpoint(sharded)[1])


@needs_hf
@pytest.mark.parametrize("kind,hf_kwargs,max_shard_bytes", [
    ("llama", LLAMA_GQA, None), ("llama", LLAMA31, 50_000), ("qwen2", QWEN2_TIED, None)])
def test_export_loads_in_transformers(tmp_path_factory, kind, hf_kwargs, max_shard_bytes):
    model, path = _save_hf(tmp_path_factory, kind, hf_kwargs)
    config, params = load_hf_checkpoint(path)
    out = str(tmp_path_factory.mktemp("export") / "model")
    save_hf_checkpoint(out, config, params, model_type=kind, max_shard_bytes=max_shard_bytes)
    reloaded = type(model).from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    inputs = _inputs(config.vocab_size)
    assert np.abs(_hf_logits(reloaded, *inputs) - _project_logits(config, params, *inputs)).max() < 1e-4


# ----------------------------------------------------------------------------- export round trips


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("max_shard_bytes", [None, 20_000])
def test_export_reimport_is_exact(tmp_path, small_config, random_params, dtype, max_shard_bytes):
    config = dataclasses.replace(small_config, param_dtype=dtype)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), random_params)  # jax arrays, as after training
    save_hf_checkpoint(tmp_path / "out", config, params, max_shard_bytes=max_shard_bytes)
    files = sorted(os.listdir(tmp_path / "out"))
    if max_shard_bytes is None:
        assert files == ["config.json", "model.safetensors"]
    else:
        with open(tmp_path / "out" / hf.INDEX_FILE) as f:
            index = json.load(f)
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 2 and files == sorted(["config.json", hf.INDEX_FILE, *shards])
        assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
        assert index["metadata"]["total_size"] == sum(x.nbytes for x in jax.tree.leaves(params))
    header, _ = hf._read_header(str(tmp_path / "out" / (shards[0] if max_shard_bytes else "model.safetensors")))
    assert {e.dtype for e in header.values()} == {"F32" if dtype == "float32" else "BF16"}
    loaded_config, loaded = load_hf_checkpoint(tmp_path / "out", dtype=dtype)
    assert loaded_config == config
    _assert_trees_equal(jax.tree.map(np.asarray, params), loaded)


def test_export_drops_value_head_and_refuses_existing_path(tmp_path, small_config, random_params, caplog):
    config = dataclasses.replace(small_config, value_head=True)
    params = {**random_params, "value_kernel": np.ones(32, np.float32), "value_bias": np.zeros((), np.float32)}
    with caplog.at_level(logging.WARNING):
        save_hf_checkpoint(tmp_path / "out", config, params)
    assert "value head" in caplog.text
    with pytest.raises(FileExistsError, match="overwrite"):
        save_hf_checkpoint(tmp_path / "out", config, params)
    save_hf_checkpoint(tmp_path / "out", small_config, random_params, overwrite=True)
    _, loaded = load_hf_checkpoint(tmp_path / "out", config)  # a value head loads zero-initialised
    assert np.all(loaded["value_kernel"] == 0) and np.array_equal(loaded["embed"], random_params["embed"])


def test_failed_export_leaves_nothing(tmp_path, small_config, random_params, monkeypatch):
    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(hf, "_write_safetensors", crash)
    with pytest.raises(OSError, match="disk full"):
        save_hf_checkpoint(tmp_path / "out", small_config, random_params)
    assert os.listdir(tmp_path) == []


def test_single_file_import_needs_config(tmp_path, small_config, random_params):
    save_hf_checkpoint(tmp_path / "out", small_config, random_params)
    file = tmp_path / "out" / "model.safetensors"
    with pytest.raises(ValueError, match="needs an explicit `config`"):
        load_hf_checkpoint(file)
    _assert_trees_equal(load_hf_checkpoint(file, small_config)[1], random_params)


# ----------------------------------------------------------------------------- bad input


def test_config_mismatch_lists_every_tensor(tmp_path, small_config, random_params):
    save_hf_checkpoint(tmp_path / "out", small_config, random_params)
    with open(tmp_path / "out" / "config.json") as f:
        hf_config = json.load(f)
    with open(tmp_path / "out" / "config.json", "w") as f:
        json.dump({**hf_config, "vocab_size": 100}, f)
    with pytest.raises(ValueError) as error:
        load_hf_checkpoint(tmp_path / "out")
    message = str(error.value)
    assert "model.embed_tokens.weight: expected shape [100, 32], found [96, 32]" in message
    assert "lm_head.weight: expected shape [100, 32], found [96, 32]" in message


def test_missing_and_unexpected_tensors_are_listed(tmp_path, small_config, random_params):
    save_hf_checkpoint(tmp_path / "out", small_config, random_params)
    file = str(tmp_path / "out" / "model.safetensors")
    tensors = safetensors.numpy.load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"], tensors["lm_head.weight"]
    tensors["model.layers.2.mlp.up_proj.weight"] = np.zeros((48, 32), np.float32)
    safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError) as error:
        load_hf_checkpoint(tmp_path / "out")
    message = str(error.value)
    for expected in ("missing model.layers.1.mlp.up_proj.weight (expected shape [48, 32])",
                     "missing lm_head.weight", "unexpected model.layers.2.mlp.up_proj.weight"):
        assert expected in message


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        load_hf_checkpoint(tmp_path / "nowhere")
    os.makedirs(tmp_path / "empty")
    with open(tmp_path / "empty" / "config.json", "w") as f:
        json.dump({"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
                   "num_hidden_layers": 1, "num_attention_heads": 2}, f)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_checkpoint(tmp_path / "empty")


def test_export_rejects_wrong_architecture_and_shapes(tmp_path, small_config, random_params):
    with pytest.raises(ValueError, match="Qwen2"):
        save_hf_checkpoint(tmp_path / "out", small_config, random_params, model_type="qwen2")
    bad = {**random_params, "final_norm": np.ones(31, np.float32)}
    with pytest.raises(ValueError, match=r"final_norm: expected shape \[32\], found \[31\]"):
        save_hf_checkpoint(tmp_path / "out", small_config, bad)
    assert not os.path.exists(tmp_path / "out")
