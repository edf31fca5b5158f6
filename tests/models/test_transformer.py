"""The decoder: packing isolation, remat grouping, GQA against a float64 numpy reference, heads, configs."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignment.config import model_preset
from alignment.models import ModelConfig, Transformer, from_hf_config
from alignment.models.attention import xla_dense
from alignment.models.transformer import dummy_inputs, rope_inverse_frequencies

BASE = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4,
                   num_kv_heads=2, qkv_bias=True, value_head=True)


def init(config, seed=0):
    params = nn.meta.unbox(Transformer(config).init(jax.random.key(seed), *dummy_inputs())["params"])
    # Norm scales and biases start at 1 and 0; randomise them so the tests see every parameter.
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype), params)


@functools.partial(jax.jit, static_argnums=0)
def forward(config, params, tokens, positions, segment_ids):
    return Transformer(config).apply({"params": params}, tokens, positions, segment_ids)


def test_packed_row_equals_samples_run_alone():
    params = init(BASE)
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 96, 7), rng.integers(0, 96, 5)
    tokens = np.concatenate([a, b, [0, 0, 0, 0]])[None]
    segments = np.array([[1] * 7 + [2] * 5 + [0] * 4])
    positions = np.array([list(range(7)) + list(range(5)) + [0] * 4])
    packed = forward(BASE, params, tokens, positions, segments)
    for sample, start in ((a, 0), (b, 7)):
        n = len(sample)
        alone = forward(BASE, params, sample[None], np.arange(n)[None], np.ones((1, n), np.int32))
        np.testing.assert_allclose(packed[0, start:start + n], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy,group,dtype,scan", [("full", 2, "float32", True), ("dots", 4, "float32", True),
                                                     ("dots_no_batch", 1, "float32", True),
                                                     ("dots", 4, "bfloat16", True), ("none", 1, "float32", False),
                                                     ("full", 2, "float32", False)])
def test_remat_groups_match_plain_forward_and_gradients(policy, group, dtype, scan):
    """Remat grouping, and unrolled layers (scan_layers=False), give the scanned model's values and gradients."""
    base = dataclasses.replace(BASE, dtype=dtype)
    rtol = 1e-6 if dtype == "float32" else 1e-2  # bf16: XLA may fuse the recomputation differently
    params = init(BASE)
    tokens, positions, segments = dummy_inputs(2, 8)
    tokens = jax.random.randint(jax.random.key(2), tokens.shape, 0, 96)

    @functools.partial(jax.jit, static_argnums=0)
    def loss(config, p):
        return jnp.sum(forward(config, p, tokens, positions, segments) ** 2)

    remat = dataclasses.replace(base, remat_policy=policy, remat_group_size=group, scan_layers=scan)
    np.testing.assert_allclose(loss(remat, params), loss(base, params), rtol=rtol)
    grad = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)
    for g1, g2 in zip(jax.tree.leaves(grad(remat, params)), jax.tree.leaves(grad(base, params))):
        atol = 1e-6 if dtype == "float32" else 0.1 * float(np.abs(g2).max())
        np.testing.assert_allclose(g1, g2, rtol=10 * rtol, atol=atol)


def numpy_attention(q, k, v, segments, positions):
    """Float64 reference: GQA by repeating K/V heads, explicit per-query loops over allowed keys."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, seq, heads, dim = q.shape
    k = np.repeat(k, heads // k.shape[2], axis=2)
    v = np.repeat(v, heads // v.shape[2], axis=2)
    out = np.zeros_like(q)
    for b in range(batch):
        for i in range(seq):
            if segments[b, i] == 0:
                continue
            allowed = (segments[b] == segments[b, i]) & (positions[b] <= positions[b, i])
            for h in range(heads):
                scores = k[b, allowed, h] @ q[b, i, h] / np.sqrt(dim)
                weights = np.exp(scores - scores.max())
                out[b, i, h] = (weights / weights.sum()) @ v[b, allowed, h]
    return out


def test_dense_attention_matches_float64_reference():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 10, 4, 8)).astype(np.float32)
    k = rng.standard_normal((2, 10, 2, 8)).astype(np.float32)
    v = rng.standard_normal((2, 10, 2, 8)).astype(np.float32)
    segments = np.array([[1] * 6 + [2] * 3 + [0], [1] * 10])
    positions = np.array([list(range(6)) + list(range(3)) + [0], list(range(10))])
    out = xla_dense(q, k, v, segments, segments, positions, positions)
    np.testing.assert_allclose(out, numpy_attention(q, k, v, segments, positions), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(out)[0, 9] == 0)  # padding query row


def test_llama3_rope_scaling_matches_formula():
    config = ModelConfig(vocab_size=8, hidden_size=64, intermediate_size=8, num_layers=1, num_heads=1,
                         num_kv_heads=1, rope_theta=500000.0,
                         rope_scaling=dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192))
    inv = 1.0 / (500000.0 ** (np.arange(0, 64, 2, dtype=np.float64) / 64))
    expected = []
    for f in inv:
        wavelen = 2 * np.pi / f
        if wavelen < 8192 / 4:
            expected.append(f)
        elif wavelen > 8192 / 1:
            expected.append(f / 8)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            expected.append((1 - smooth) * f / 8 + smooth * f)
    np.testing.assert_allclose(rope_inverse_frequencies(config), expected, rtol=1e-5)


def test_heads_and_bf16_compute():
    params = init(BASE)
    tokens, positions, segments = dummy_inputs(2, 6)
    model = Transformer(BASE)
    hidden = model.apply({"params": params}, tokens, positions, segments)
    logits = model.apply({"params": params}, hidden, method="logits")
    values = model.apply({"params": params}, hidden, method="values")
    np.testing.assert_allclose(logits, np.asarray(hidden) @ np.asarray(params["lm_head"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(values, np.asarray(hidden) @ np.asarray(params["value_kernel"])
                               + np.asarray(params["value_bias"]), rtol=1e-5, atol=1e-5)
    bf16 = dataclasses.replace(BASE, dtype="bfloat16")
    hidden16 = Transformer(bf16).apply({"params": params}, tokens, positions, segments)
    assert hidden16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(hidden16, np.float32), hidden, rtol=0.1, atol=0.1)


def test_tied_embeddings_have_no_head():
    tied = dataclasses.replace(BASE, tie_embeddings=True)
    params = init(tied)
    assert "lm_head" not in params
    unembedding = Transformer(tied).apply({"params": params}, method="unembedding")
    np.testing.assert_array_equal(unembedding, params["embed"].T)
    assert tied.num_params() == sum(x.size for x in jax.tree.leaves(params))


@pytest.mark.parametrize("name", ["tiny", "llama3_8b", "llama3_70b", "qwen2_7b", "qwen2_72b"])
def test_presets_build_with_expected_sizes(name):
    config = ModelConfig.from_dict(model_preset(name).to_dict())
    expected = {"tiny": 1.05e6, "llama3_8b": 8.03e9, "llama3_70b": 70.55e9, "qwen2_7b": 7.62e9,
                "qwen2_72b": 72.71e9}[name]
    assert abs(config.num_params() - expected) / expected < 0.01


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="did you mean 'num_heads'"):
        ModelConfig.from_dict(dict(BASE.__dict__, num_haeds=4))
    with pytest.raises(ValueError, match="remat_group_size"):
        dataclasses.replace(BASE, remat_group_size=3)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        dataclasses.replace(BASE, num_kv_heads=3)
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        from_hf_config(dict(model_type="gpt2"))
