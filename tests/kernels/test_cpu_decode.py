"""The CPU bfloat16 decode kernels (kernels/cpu_decode): the matmul against float64 numpy, the attention against
the XLA implementation it stands in for and float64 numpy, and the packed kernels built on the matmul."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignment.models.packed import Packed
from alignment_kernels.cpu_decode import api, reference
from alignment_kernels.paged_attention import xla as paged_xla

needs_kernel = pytest.mark.skipif(not api.available(), reason=f"cpu_decode cannot run here: {api.unavailable_reason()}")


def _bf16(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)


def _close_to_float64(y, x, w):
    """float32 sums of exact products: within K float32 roundings of sum |x w| per entry."""
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    bound = x64.shape[1] * 2.0 ** -23 * (np.abs(x64) @ np.abs(w64)) + 1e-30
    error = np.abs(np.asarray(y, np.float64) - reference.matmul(x64, w64))
    assert np.all(error <= bound), float((error / bound).max())


def test_pack_and_unpack_are_inverse_with_zero_padding():
    rng = np.random.default_rng()
    w = _bf16(rng, (7, 70))
    packed = api.pack(w)
    assert packed.shape == (2, 4, api.BLOCK, 2) and packed.dtype == jnp.bfloat16
    unpacked = api.unpack(packed, 70)
    assert unpacked.shape == (8, 70)
    np.testing.assert_array_equal(np.asarray(unpacked[:7], np.float32), np.asarray(w, np.float32))
    assert not np.asarray(unpacked[7], np.float32).any()


@needs_kernel
@pytest.mark.parametrize("m,k,n", [(1, 512, 1408), (3, 7, 70), (4, 64, 64), (5, 1408, 512), (17, 96, 200),
                                   (64, 33, 129)])
def test_matches_float64_on_fresh_random_inputs(m, k, n):
    rng = np.random.default_rng()
    x, w = _bf16(rng, (m, k)), _bf16(rng, (k, n))
    y = jax.jit(api.matmul, static_argnums=2)(x, api.pack(w), n)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    _close_to_float64(y, x, w)


@needs_kernel
def test_inside_a_loop_as_the_decode_program_calls_it():
    rng = np.random.default_rng()
    x, w = _bf16(rng, (2, 128)), _bf16(rng, (128, 128))
    packed = api.pack(w)

    def steps(x):
        return jax.lax.fori_loop(0, 3, lambda i, x: api.matmul(x, packed, 128).astype(jnp.bfloat16) * 0.05, x)

    expected = x
    for _ in range(3):
        expected = (jnp.dot(expected, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16) * 0.05)
    np.testing.assert_allclose(np.asarray(jax.jit(steps)(x), np.float32), np.asarray(expected, np.float32),
                               rtol=2e-2, atol=1e-3)


@needs_kernel
@pytest.mark.parametrize("rows", [3, api.MAX_ROWS + 1])  # the kernel; XLA's matmul past MAX_ROWS
def test_packed_kernel_projects_like_the_einsum(rows):
    """o_proj's shape: two input axes [heads, head_dim] -> hidden; x [rows, 1, heads, head_dim]."""
    rng = np.random.default_rng()
    w, x = _bf16(rng, (4, 16, 48)), _bf16(rng, (rows, 1, 4, 16))
    y = jax.jit(Packed.apply)(Packed.of(w, input_axes=2), x)
    assert y.shape == (rows, 1, 48) and y.dtype == jnp.float32
    _close_to_float64(y.reshape(rows, 48), x.reshape(rows, 64), w.reshape(64, 48))


def test_packed_kernel_refuses_float32_inputs_and_wrong_shapes():
    w = jnp.zeros((8, 64), jnp.bfloat16)
    packed = Packed.of(w, input_axes=1)
    with pytest.raises(ValueError, match="bfloat16"):
        packed.apply(jnp.zeros((2, 8), jnp.float32))
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        packed.apply(jnp.zeros((2, 9), jnp.bfloat16))


def test_unavailable_names_the_reason(monkeypatch):
    monkeypatch.setattr(api, "_cpu_flags", lambda: {"avx2", "fma"})
    api._load.cache_clear()
    try:
        assert not api.available() and "AVX512-BF16" in api.unavailable_reason()
        with pytest.raises(RuntimeError, match="AVX512-BF16"):
            api.matmul(jnp.zeros((1, 2), jnp.bfloat16), api.pack(jnp.zeros((2, 64))), 64)
    finally:
        api._load.cache_clear()


def _words(x):
    return jax.lax.bitcast_convert_type(x, jnp.uint16)


@needs_kernel
@pytest.mark.parametrize("rows,heads,kv_heads,head_dim,length",
                         [(5, 8, 4, 64, 48), (3, 4, 1, 32, 40), (2, 6, 6, 16, 7)])
def test_attention_matches_dense_attention_and_float64(rows, heads, kv_heads, head_dim, length):
    """One query per row at position kv_lens - 1 over per-row views (K positions-minor, V positions-major)."""
    rng = np.random.default_rng()
    q = _bf16(rng, (rows, heads, head_dim))
    k, v = _bf16(rng, (rows, length, kv_heads, head_dim)), _bf16(rng, (rows, length, kv_heads, head_dim))
    kv_lens = jnp.asarray(rng.integers(1, length + 1, rows), jnp.int32).at[0].set(length)
    out = jax.jit(api.attention)(q, _words(k.transpose(0, 2, 3, 1)), _words(v.transpose(0, 2, 1, 3)), kv_lens)
    assert out.shape == q.shape and out.dtype == jnp.bfloat16
    xla = paged_xla.dense_attention(q[:, None], k, v, kv_lens, (kv_lens - 1)[:, None])[:, 0]
    # Same float32 scores, softmax and sums in another order: at most one bf16 rounding step apart.
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(xla, np.float32), rtol=2 ** -7, atol=1e-3)
    # float64 reference over the bf16 inputs
    q64, k64, v64 = (np.asarray(a, np.float64) for a in (q, k, v))
    group = heads // kv_heads
    for r in range(rows):
        n = int(kv_lens[r])
        for h in range(heads):
            scores = k64[r, :n, h // group] @ q64[r, h] / np.sqrt(head_dim)
            p = np.exp(scores - scores.max())
            expected = (p / p.sum()) @ v64[r, :n, h // group]
            np.testing.assert_allclose(np.asarray(out[r, h], np.float64), expected, rtol=2 ** -6, atol=2e-2)


@needs_kernel
def test_attention_refuses_mismatched_layouts():
    q = jnp.zeros((2, 4, 16), jnp.bfloat16)
    k = jnp.zeros((2, 2, 16, 8), jnp.uint16)
    with pytest.raises(Exception, match="decode_attention: want"):
        jax.block_until_ready(api.attention(q, k, jnp.zeros((2, 2, 16, 8), jnp.uint16), jnp.ones((2,), jnp.int32)))
