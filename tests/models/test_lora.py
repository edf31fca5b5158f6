"""LoRA / QLoRA kernels: exactness at init, adapter gradients as projections of the full gradient (float64 numpy
reference), merge, and the quantisers' stated error."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignment.models import ModelConfig, Transformer
from alignment.models import lora
from alignment.models.transformer import dummy_inputs

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                     scan_layers=True)
SPEC = lora.LoraSpec(rank=4, alpha=8.0)


def setup(spec=SPEC, config=CONFIG, seed=0):
    model = Transformer(config)
    boxed = jax.eval_shape(lambda k: model.init(k, *dummy_inputs())["params"], jax.random.key(0))
    params = nn.meta.unbox(model.init(jax.random.key(seed), *dummy_inputs())["params"])
    abstract = nn.meta.unbox(lora.adapter_shapes(boxed, spec))
    adapters = lora.init_adapters(jax.random.key(seed + 1), abstract, spec)
    return model, params, adapters


def batch(seed=0, rows=2, seq=7):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (rows, seq)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (rows, seq))
    return tokens, positions, jnp.ones((rows, seq), jnp.int32)


def logits(model, params, inputs):
    hidden = model.apply({"params": params}, *inputs)
    return model.apply({"params": params}, hidden, method="logits")


def randomize_b(adapters, seed=3, std=0.05):
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: std * jax.random.normal(next(keys), x.shape, x.dtype) if p[-1].key == "b" else x, adapters)


def test_full_rank_zero_b_is_exactly_the_base_model():
    spec = lora.LoraSpec(rank=32, alpha=32.0)  # rank = hidden size: full rank for every d -> * kernel
    model, params, adapters = setup(spec)
    assert all(float(jnp.abs(ab["b"]).max()) == 0 for _, ab in lora.adapter_items(adapters))
    inputs = batch()
    base = logits(model, params, inputs)
    adapted = logits(model, lora.bind(params, adapters, spec), inputs)
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(base))


@pytest.mark.parametrize("rslora", [False, True])
def test_adapted_model_equals_merged_weights(rslora):
    spec = dataclasses.replace(SPEC, rslora=rslora)
    model, params, adapters = setup(spec)
    adapters = randomize_b(adapters)
    inputs = batch()
    adapted = logits(model, lora.bind(params, adapters, spec), inputs)
    merged = logits(model, lora.merge(params, adapters, spec), inputs)
    assert float(jnp.abs(adapted - logits(model, params, inputs)).max()) > 1e-3  # the adapters do something
    np.testing.assert_allclose(np.asarray(adapted), np.asarray(merged), atol=2e-5)


def test_adapters_train_in_float32_on_a_bfloat16_base():
    """A bfloat16 base (param and compute dtype) gets float32 adapters, as PEFT keeps them; the adapted model
    runs and the adapters' gradients come back float32."""
    config = dataclasses.replace(CONFIG, dtype="bfloat16", param_dtype="bfloat16")
    model, params, adapters = setup(config=config)
    assert {x.dtype for x in jax.tree.leaves(params["layers"])} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(adapters)} == {jnp.dtype(jnp.float32)}
    inputs = batch()
    adapted = logits(model, lora.bind(params, randomize_b(adapters), SPEC), inputs)
    grads = jax.grad(lambda a: logits(model, lora.bind(params, a, SPEC), inputs).astype(jnp.float32).sum())(adapters)
    assert bool(jnp.isfinite(adapted).all()) and {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    assert all(float(jnp.abs(g).max()) > 0 for _, ab in lora.adapter_items(grads) for g in [ab["b"]])


def test_targets_select_kernels_and_bad_targets_fail():
    model, params, _ = setup()
    spec = dataclasses.replace(SPEC, targets=r"layers/(q|v)_proj")
    assert lora.target_paths(params, spec) == [("layers", "q_proj"), ("layers", "v_proj")]
    with pytest.raises(ValueError, match="not a projection kernel"):
        lora.target_paths(params, dataclasses.replace(SPEC, targets="embed"))
    with pytest.raises(ValueError, match="selects no parameter"):
        lora.target_paths(params, dataclasses.replace(SPEC, targets="nothing_here"))


def _loss(model, params, inputs):
    out = logits(model, params, inputs)
    return jnp.mean(jax.nn.log_softmax(out)[..., 3])


def test_adapter_gradients_are_projections_of_the_full_gradient():
    """dL/dA = s G B^T and dL/dB = s A^T G, G = dL/dW at the merged W (float64 numpy for the projections)."""
    model, params, adapters = setup()
    adapters = randomize_b(adapters)
    inputs = batch()
    grads = jax.grad(lambda t: _loss(model, lora.bind(params, t, SPEC), inputs))(adapters)
    merged = lora.merge(params, adapters, SPEC)
    full = jax.grad(lambda p: _loss(model, p, inputs))(merged)
    for keys, ab in lora.adapter_items(adapters):
        g = np.asarray(full[keys[0]][keys[1]], np.float64)
        a, b = np.asarray(ab["a"], np.float64), np.asarray(ab["b"], np.float64)
        layers, rank = a.shape[0], a.shape[-1]
        g2 = g.reshape(layers, int(np.prod(a.shape[1:-1])), -1)
        a2, b2 = a.reshape(layers, -1, rank), b.reshape(layers, rank, -1)
        want_a = SPEC.scale * np.einsum("lio,lro->lir", g2, b2)
        want_b = SPEC.scale * np.einsum("lir,lio->lro", a2, g2)
        got = lora._get(grads["lora"], keys)
        scale = max(np.abs(want_a).max(), np.abs(want_b).max())
        np.testing.assert_allclose(np.asarray(got["a"]).reshape(want_a.shape), want_a, atol=1e-5 * scale, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(got["b"]).reshape(want_b.shape), want_b, atol=1e-5 * scale, rtol=1e-4)


def test_dropout_uses_its_key_and_is_off_without_one():
    spec = dataclasses.replace(SPEC, dropout=0.5)
    model, params, adapters = setup(spec)
    adapters = randomize_b(adapters)
    inputs = batch()
    no_dropout = logits(model, lora.bind(params, adapters, spec), inputs)
    merged = logits(model, lora.merge(params, adapters, spec), inputs)
    np.testing.assert_allclose(np.asarray(no_dropout), np.asarray(merged), atol=2e-5)
    one = logits(model, lora.bind(params, adapters, spec, jax.random.key(1)), inputs)
    again = logits(model, lora.bind(params, adapters, spec, jax.random.key(1)), inputs)
    other = logits(model, lora.bind(params, adapters, spec, jax.random.key(2)), inputs)
    np.testing.assert_array_equal(np.asarray(one), np.asarray(again))
    assert float(jnp.abs(one - other).max()) > 1e-4


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantised_kernels_within_the_stated_error(kind):
    rng = np.random.default_rng(0)
    kernel = jnp.asarray(rng.normal(size=(2, 32, 4, 6)).astype(np.float32))
    q = lora.quantize(kernel, kind, input_axes=1, block_size=64)
    back = np.asarray(q.dequantize(), np.float64)
    w = np.asarray(kernel, np.float64)
    if kind == "int8":
        bound = np.abs(w).max(axis=1, keepdims=True) / 127 / 2  # half a step of the per-channel scale
        assert q.codes.dtype == jnp.int8 and q.codes.shape == kernel.shape
    else:
        blocks = w.reshape(2, -1, 64)
        bound = (np.abs(blocks).max(-1, keepdims=True) * lora.NF4_MAX_ERROR * np.ones_like(blocks)).reshape(w.shape)
        assert q.codes.dtype == jnp.uint8 and q.codes.size * 2 == kernel.size  # two codes a byte
        # Each value is the nearest level times its block's absmax (float64 check of the rounding).
        levels = lora.NF4_LEVELS.astype(np.float64)
        absmax = np.abs(blocks).max(-1, keepdims=True)
        nearest = levels[np.argmin(np.abs(blocks[..., None] / absmax[..., None] - levels), -1)] * absmax
        np.testing.assert_allclose(back, nearest.reshape(w.shape), atol=1e-6)
    assert np.all(np.abs(back - w) <= bound + 1e-6)


def test_qlora_model_runs_on_dequantised_weights():
    spec = dataclasses.replace(SPEC, quantize="nf4")
    model, params, adapters = setup(spec)
    frozen = lora.quantize_frozen(params, spec)
    adapters = randomize_b(adapters)
    inputs = batch()
    q_logits = logits(model, lora.bind(frozen, adapters, spec), inputs)
    reference = logits(model, lora.merge(frozen, adapters, spec), inputs)  # merge dequantises
    np.testing.assert_allclose(np.asarray(q_logits), np.asarray(reference), atol=2e-5)
    adapters_off = logits(model, frozen, inputs)
    dequantised = logits(model, lora.dequantize_tree(frozen), inputs)
    np.testing.assert_allclose(np.asarray(adapters_off), np.asarray(dequantised), atol=2e-5)
