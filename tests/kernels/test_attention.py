"""Attention kernels against the dense float32 oracle: values and gradients, packing, padding, GQA."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignment import sharding
from alignment.models import ModelConfig
from alignment.models.attention import shard_over_mesh, xla_dense
from alignment.models.transformer import Transformer
from alignment_kernels.attention import api, pallas_gpu, pallas_tpu, reference, xla

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def packed_vectors(rng, batch: int, seq: int):
    """segment ids (two or three packed samples per row, a padded tail) and positions restarting per sample."""
    seg = np.zeros((batch, seq), np.int32)
    pos = np.zeros((batch, seq), np.int32)
    for row in range(batch):
        cuts = np.sort(rng.choice(np.arange(2, seq - 4), size=2, replace=False))
        bounds = [0, *cuts, seq - 3 * (row + 1)]  # row-dependent amount of padding
        for sample, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            seg[row, lo:hi] = sample + 1
            pos[row, lo:hi] = np.arange(hi - lo)
    return jnp.asarray(seg), jnp.asarray(pos)


def make_inputs(seed: int, *, batch=2, seq=37, heads=4, kv_heads=2, head_dim=64, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((batch, seq, n, head_dim)), dtype)
               for n in (heads, kv_heads, kv_heads))
    seg, pos = packed_vectors(rng, batch, seq)
    d_out = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)  # a fixed random cotangent
    return (q, k, v, seg, seg, pos, pos), d_out


def check_against_reference(fn, seed, dtype, head_dim, batch=2, seq=37):
    args, d_out = make_inputs(seed, dtype=dtype, head_dim=head_dim, batch=batch, seq=seq)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v, *args[3:]).astype(jnp.float32) * d_out)
    out = jax.jit(fn)(*args)
    expected = reference.attention(*args)
    assert out.dtype == dtype
    assert rel_err(out, expected) < TOLERANCE[dtype]
    padding = np.asarray(args[3] == 0)
    assert padding.any() and np.all(np.asarray(out)[padding] == 0)
    grads = jax.jit(jax.grad(loss(fn), (0, 1, 2)))(*args[:3])
    expected_grads = jax.grad(loss(reference.attention), (0, 1, 2))(*args[:3])
    for name, g, e in zip("qkv", grads, expected_grads):
        assert g.dtype == dtype
        assert rel_err(g, e) < TOLERANCE[dtype], name


CASES = [(jnp.float32, 64), (jnp.bfloat16, 128)]


@pytest.mark.parametrize("dtype,head_dim", CASES)
def test_xla_flash_matches_reference(dtype, head_dim):
    # block_k 16 does not divide the 37 keys: the last block is padded.
    check_against_reference(functools.partial(xla.attention, block_q=8, block_k=16), 1, dtype, head_dim)


def test_xla_flash_skips_tiles_between_packed_samples():
    """Many short samples per row: each query block runs exactly the span of key blocks from its first to its
    last tile of the block-reduced mask, most tiles are skipped, and values and gradients match the oracle."""
    rng = np.random.default_rng(11)
    batch, seq = 2, 64
    lengths = [[9, 12, 7, 15, 10, 6], [16, 5, 11, 13, 8, 6]]  # a padded tail of 5 in each row
    seg, pos = np.zeros((batch, seq), np.int32), np.zeros((batch, seq), np.int32)
    for row, row_lengths in enumerate(lengths):
        start = 0
        for sample, n in enumerate(row_lengths):
            seg[row, start:start + n], pos[row, start:start + n] = sample + 1, np.arange(n)
            start += n
    q, k, v = (jnp.asarray(rng.standard_normal((batch, seq, n, 16)), jnp.float32) for n in (4, 2, 2))
    args = (q, k, v, jnp.asarray(seg), jnp.asarray(seg), jnp.asarray(pos), jnp.asarray(pos))
    tiles = xla._Tiles(*args, block_q=8, block_k=8)
    expected_table = np.asarray(reference.mask(*args[3:])).reshape(batch, 8, 8, 8, 8).any(axis=(0, 2, 4))
    first = [int(np.argmax(r)) for r in expected_table]
    end = [int(len(r) - np.argmax(r[::-1])) for r in expected_table]
    np.testing.assert_array_equal(np.asarray(tiles.first), first)
    np.testing.assert_array_equal(np.asarray(tiles.end), end)
    assert sum(end) - sum(first) < 0.6 * 36  # 36 tiles on or below the diagonal
    d_out = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    flash = functools.partial(xla.attention, block_q=8, block_k=8)
    assert rel_err(jax.jit(flash)(*args), reference.attention(*args)) < 1e-5
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v, *args[3:]) * d_out)
    grads = jax.jit(jax.grad(loss(flash), (0, 1, 2)))(q, k, v)
    for g, e in zip(grads, jax.grad(loss(reference.attention), (0, 1, 2))(q, k, v)):
        assert rel_err(g, e) < 1e-5


@pytest.mark.parametrize("dtype,head_dim", CASES)
def test_pallas_gpu_interpret_matches_reference(dtype, head_dim):
    fn = functools.partial(pallas_gpu.attention, blocks=pallas_gpu.BlockSizes(16, 16), interpret=True)
    check_against_reference(fn, 2, dtype, head_dim)


def test_pallas_gpu_tile_spans_cover_exactly_the_tiles_with_allowed_pairs():
    """Each program's span runs from its first to its last tile with an allowed pair (numpy brute force);
    on packed rows that leaves out the upper triangle and the tiles between samples outside the span."""
    rng = np.random.default_rng(8)
    seg, pos = packed_vectors(rng, 2, 64)
    (first_k, end_k), (first_q, end_q) = pallas_gpu.tile_spans(seg, seg, pos, pos, 8, 16)
    tiles = np.asarray(reference.mask(seg, seg, pos, pos)).reshape(2, 8, 8, 4, 16).any(axis=(2, 4))  # [b, nq, nk]
    for b in range(2):
        for i in range(8):
            hits = np.flatnonzero(tiles[b, i])
            assert (first_k[b, i], end_k[b, i]) == ((hits[0], hits[-1] + 1) if hits.size else (0, 0))
        for j in range(4):
            hits = np.flatnonzero(tiles[b, :, j])
            assert (first_q[b, j], end_q[b, j]) == ((hits[0], hits[-1] + 1) if hits.size else (0, 0))
    assert int(np.sum(np.asarray(end_k - first_k))) < 0.6 * 2 * 8 * 4  # most tiles are never visited


@pytest.mark.parametrize("dtype,head_dim", CASES)
def test_pallas_tpu_interpret_matches_reference(dtype, head_dim):
    fn = functools.partial(pallas_tpu.attention, blocks=pallas_tpu.BlockSizes(16, 16), interpret=True)
    check_against_reference(fn, 3, dtype, head_dim, batch=1, seq=21)  # interpret mode is slow: keep it tiny


def test_cudnn_wrapper_semantics_on_xla():
    # The cuDNN path builds an explicit mask; its semantics are checked with the XLA backend of the same call.
    check_against_reference(functools.partial(api.cudnn, implementation="xla"), 4, jnp.float32, 64)


def test_reference_matches_model_dense_attention():
    args, _ = make_inputs(5)
    assert rel_err(xla_dense(*args), reference.attention(*args)) < 1e-6


def test_dispatch_by_backend_and_fallback():
    assert jax.default_backend() == "cpu"
    assert api.get_impl(None)[0] == "xla"
    assert api.get_impl("pallas")[0] == "xla"  # no Pallas compiler on CPU: logged fallback
    assert api.get_impl("pallas_tpu")[0] == "xla"
    assert api.get_impl("cudnn")[0] == "xla"
    assert api.get_impl("pallas_tpu", interpret=True)[0] == "pallas_tpu"
    with pytest.raises(ValueError, match="unknown implementation 'flash2'.*choose from"):
        api.get_impl("flash2")


def test_shard_over_mesh_matches_unsharded():
    """The shard_map wrapper used for Pallas kernels, exercised with the flash kernel on 8 devices."""
    args, d_out = make_inputs(6, batch=4, seq=20, heads=4, kv_heads=2, head_dim=16)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    wrapped = shard_over_mesh(functools.partial(xla.attention, block_q=8, block_k=8))

    @jax.jit
    def value_and_grads(q, k, v):
        with sharding.activation_sharding(mesh, sharding.DEFAULT_RULES):
            return jax.value_and_grad(lambda q, k, v: jnp.sum(wrapped(q, k, v, *args[3:]) * d_out), (0, 1, 2))(q, k, v)

    value, grads = value_and_grads(*args[:3])
    expected, expected_grads = jax.value_and_grad(
        lambda q, k, v: jnp.sum(reference.attention(q, k, v, *args[3:]) * d_out), (0, 1, 2))(*args[:3])
    assert rel_err(value, expected) < 1e-5
    for g, e in zip(grads, expected_grads):
        assert rel_err(g, e) < 1e-5


def test_model_flash_equals_dense_on_packed_batch():
    config = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    rng = np.random.default_rng(7)
    seg, pos = packed_vectors(rng, 2, 24)
    tokens = jnp.asarray(rng.integers(0, 64, (2, 24)), jnp.int32)
    dense = Transformer(ModelConfig(**config, attention_impl="xla_dense"))
    params = dense.init(jax.random.key(0), tokens, pos, seg)["params"]
    expected = dense.apply({"params": params}, tokens, pos, seg)
    for impl in ("xla_flash", "pallas"):  # "pallas" falls back to the flash kernel on CPU
        out = Transformer(ModelConfig(**config, attention_impl=impl)).apply({"params": params}, tokens, pos, seg)
        assert rel_err(out, expected) < 1e-5, impl
