"""SFT loss: packed rows train exactly like their samples run one by one; both normalisations."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignment.algorithms.sft import segment_token_counts, sft_loss
from alignment.data.packing import pack_row
from alignment.data.sft import stack
from alignment.models import ModelConfig, Transformer
from alignment.models.transformer import dummy_inputs

CONFIG = ModelConfig(vocab_size=80, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)
MODEL = Transformer(CONFIG)


def samples(seed, lengths=(9, 6, 12)):
    rng = np.random.default_rng(seed)
    return [{"inputs": rng.integers(0, 80, n), "targets": rng.integers(0, 80, n), "loss_mask": rng.random(n) < 0.6}
            for n in lengths]


@functools.partial(jax.jit, static_argnames="normalization")
def mean_loss_and_grad(params, batch, normalization):
    def mean(p):
        total, (count, _) = sft_loss(MODEL, p, batch, jax.random.key(0), normalization)
        return total / count

    return jax.value_and_grad(mean)(params)


@pytest.mark.parametrize("normalization", ["token", "sample"])
def test_packed_equals_unpacked(normalization):
    params = nn.meta.unbox(MODEL.init(jax.random.key(1), *dummy_inputs())["params"])
    data = samples(2)
    packed = stack([pack_row(data, 32)])
    unpacked = stack([pack_row([s], 16) for s in data])
    loss_p, grad_p = mean_loss_and_grad(params, packed, normalization)
    loss_u, grad_u = mean_loss_and_grad(params, unpacked, normalization)
    np.testing.assert_allclose(loss_p, loss_u, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grad_p), jax.tree.leaves(grad_u)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_normalisations_match_numpy():
    params = nn.meta.unbox(MODEL.init(jax.random.key(3), *dummy_inputs())["params"])
    data = samples(4)
    batch = stack([pack_row(data[:2], 24), pack_row(data[2:], 24)])
    hidden = MODEL.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
    logits = np.asarray(MODEL.apply({"params": params}, hidden, method="logits"), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    mask = batch["loss_mask"]
    token_mean = nll[mask].mean()
    sample_means = [nll[(batch["segment_ids"] == s) & mask & (np.arange(2)[:, None] == r)].mean()
                    for r, s in ((0, 1), (0, 2), (1, 1))]
    for normalization, expected in (("token", token_mean), ("sample", np.mean(sample_means))):
        total, (count, _) = sft_loss(MODEL, params, batch, jax.random.key(0), normalization)
        np.testing.assert_allclose(total / count, expected, rtol=1e-5)


def test_segment_token_counts():
    mask = jnp.array([[1, 1, 0, 1, 0], [0, 1, 1, 1, 0]])
    segments = jnp.array([[1, 1, 1, 2, 0], [1, 1, 2, 2, 0]])
    np.testing.assert_array_equal(segment_token_counts(mask, segments), [[2, 2, 2, 1, 0], [1, 1, 2, 2, 0]])
