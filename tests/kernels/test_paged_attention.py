"""Paged attention against the dense attention oracle: ragged key lengths, prefill chunks and decode tokens in one
call, pages shared between rows, GQA, padding queries; every implementation (Pallas ones in interpret mode)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignment_kernels import lowering
from alignment_kernels.attention import reference as dense
from alignment_kernels.paged_attention import api, pallas_gpu, pallas_tpu, reference, xla

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def make_case(seed, *, heads=4, kv_heads=2, head_dim=64, page_size=16, dtype=jnp.float32, q_len=8):
    """Four rows over one page pool: a prefill chunk continuing a cached prefix, a decode token, a chunk with
    padding queries, and an empty row. Rows 0 and 1 share their first two pages (a common prefix)."""
    rng = np.random.default_rng(seed)
    kv_lens = np.array([45, 38, 20, 0], np.int32)
    per_row = 4
    num_pages = 16
    free = list(rng.permutation(np.arange(1, num_pages)))
    table = np.zeros((4, per_row), np.int32)
    table[0] = [free.pop() for _ in range(per_row)]
    table[1, :2] = table[0, :2]  # the shared prefix: positions 0-31 of rows 0 and 1 are the same keys
    table[1, 2:] = [free.pop() for _ in range(2)]
    table[2, :2] = [free.pop() for _ in range(2)]
    positions = np.full((4, q_len), -1, np.int32)
    positions[0] = np.arange(45 - q_len, 45)  # the last q_len tokens of row 0
    positions[1, 0] = 37  # one decode token
    real = min(5, q_len - 1)
    positions[2, :real] = np.arange(20 - real, 20)  # real queries, then padding ones
    q = jnp.asarray(rng.standard_normal((4, q_len, heads, head_dim)), dtype)
    k_pages, v_pages = (jnp.asarray(rng.standard_normal((kv_heads, num_pages, page_size, head_dim)), dtype)
                        for _ in range(2))
    return q, k_pages, v_pages, jnp.asarray(table), jnp.asarray(kv_lens), jnp.asarray(positions)


def dense_oracle(q, k_pages, v_pages, table, kv_lens, positions):
    """Row by row: the row's keys laid out densely (read page by page on the host) through the dense oracle."""
    k_pages, v_pages, table = np.asarray(k_pages, np.float32), np.asarray(v_pages, np.float32), np.asarray(table)
    page_size = k_pages.shape[2]
    outs = []
    for r in range(q.shape[0]):
        n = max(int(kv_lens[r]), 1)
        keys = np.arange(n)
        k = k_pages[:, table[r, keys // page_size], keys % page_size].transpose(1, 0, 2)[None]
        v = v_pages[:, table[r, keys // page_size], keys % page_size].transpose(1, 0, 2)[None]
        kv_seg = (keys < kv_lens[r]).astype(np.int32)[None]
        q_seg = (np.asarray(positions[r]) >= 0).astype(np.int32)[None]
        outs.append(dense.attention(jnp.asarray(q[r:r + 1], jnp.float32), jnp.asarray(k), jnp.asarray(v),
                                    jnp.asarray(q_seg), jnp.asarray(kv_seg), jnp.asarray(positions[r:r + 1]),
                                    jnp.asarray(keys[None])))
    return jnp.concatenate(outs)


def test_reference_equals_the_dense_oracle():
    case = make_case(0)
    out = reference.paged_attention(*case)
    np.testing.assert_allclose(out, dense_oracle(*case), atol=1e-5)
    padding = np.asarray(case[-1]) < 0
    assert padding.any() and np.all(np.asarray(out)[padding] == 0)


IMPLEMENTATIONS = {
    "xla": xla.paged_attention,
    "pallas_tpu": functools.partial(pallas_tpu.paged_attention, interpret=True),
    "pallas_gpu": functools.partial(pallas_gpu.paged_attention, interpret=True),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
def test_implementations_match_the_reference(impl, dtype):
    case = make_case(1, dtype=dtype)
    out = jax.jit(IMPLEMENTATIONS[impl])(*case)
    expected = reference.paged_attention(*case)
    assert out.dtype == dtype and out.shape == case[0].shape
    assert rel_err(out, expected) < TOLERANCE[dtype]
    padding = np.asarray(case[-1]) < 0
    assert np.all(np.asarray(out, np.float32)[padding] == 0)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_grouped_heads_and_head_dim_128(impl):
    case = make_case(2, heads=8, kv_heads=2, head_dim=128, q_len=3)
    assert rel_err(jax.jit(IMPLEMENTATIONS[impl])(*case), reference.paged_attention(*case)) < 1e-5


def test_api_picks_and_falls_back():
    assert api.get_impl(None)[0] == "xla"  # the CPU default
    assert api.get_impl("pallas_tpu")[0] == "xla"  # cannot compile here: falls back
    assert api.get_impl("pallas_tpu", interpret=True)[0] == "pallas_tpu"
    with pytest.raises(ValueError, match="unknown implementation"):
        api.get_impl("flash")


@pytest.fixture
def tpu_chip():
    lowering.register_tpu_chip("v5e")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bfloat16", "float32"])
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_pallas_kernels_lower(platform, dtype, tpu_chip):
    """Llama-3-8B-shaped decode (32 query / 8 kv heads, 128 rows, 4k tokens a row) and a prefill chunk of 256."""
    spec = jax.ShapeDtypeStruct
    for rows, q_len in ((128, 1), (8, 256)):
        pages = spec((8, 4096, 16, 128), dtype)
        args = (spec((rows, q_len, 32, 128), dtype), pages, pages, spec((rows, 256), jnp.int32),
                spec((rows,), jnp.int32), spec((rows, q_len), jnp.int32))
        fn = functools.partial(api.paged_attention, impl="pallas")
        traced = lowering.trace(fn, args, platform)
        lowering.expect_kernels(lowering.lower(traced, platform, f"paged attention rows {rows} q_len {q_len}"),
                                platform)
        problems = (lowering.vmem_problems(traced.jaxpr) if platform == "tpu"
                    else lowering.register_problems(traced.jaxpr))
        assert not problems, problems
