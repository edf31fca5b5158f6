"""The CPU bfloat16 decode matmul (kernels/cpu_matmul) against float64 numpy, and the packed kernels built on it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignment.models.packed import Packed
from alignment_kernels.cpu_matmul import api, reference

needs_kernel = pytest.mark.skipif(not api.available(), reason=f"cpu_matmul cannot run here: {api.unavailable_reason()}")


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
