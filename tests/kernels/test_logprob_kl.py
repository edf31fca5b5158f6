"""Fused output-head log-prob / entropy / top-K KL against the dense oracle and float64 numpy."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignment.algorithms import logprobs
from alignment_kernels.logprob_kl import api, pallas_gpu, pallas_tpu, reference, xla

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
N, D, V, K = 37, 16, 203, 11  # N and V divisible by none of the test block sizes
TEMPERATURE = 0.7


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def make_inputs(seed: int, dtype=jnp.float32, n=N, vocab=V, k=K, d=D):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.standard_normal((n, d)), dtype)
    unembedding = jnp.asarray(rng.standard_normal((d, vocab)) * 0.5, dtype)
    targets = jnp.asarray(rng.integers(0, vocab, n), jnp.int32)
    ids = jnp.asarray(np.stack([rng.permutation(vocab)[:k] for _ in range(n)]), jnp.int32)
    ref_logp = jax.nn.log_softmax(jnp.asarray(rng.standard_normal((n, k)) * 2, jnp.float32), axis=-1)
    mask = jnp.asarray(rng.random(n) < 0.7, jnp.float32)  # masked tokens contribute nothing
    weights = [jnp.asarray(rng.standard_normal(n), jnp.float32) * mask for _ in range(3)]
    return hidden, unembedding, targets, ids, ref_logp, weights


def numpy_oracle(hidden, unembedding, targets, ids, ref_logp, temperature):
    """float64 numpy: (logp, entropy, top-K KL)."""
    logits = np.asarray(hidden, np.float64) @ np.asarray(unembedding, np.float64) / temperature
    logits -= logits.max(-1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    rows = np.arange(len(targets))
    z_k = np.take_along_axis(logits, np.asarray(ids), -1)
    log_q = z_k - np.log(np.exp(z_k - z_k.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z_k.max(-1, keepdims=True)
    kl = (np.exp(log_q) * (log_q - np.asarray(ref_logp, np.float64))).sum(-1)
    return log_p[rows, np.asarray(targets)], -(np.exp(log_p) * log_p).sum(-1), kl


def weighted_loss(fn, targets, ids, ref_logp, weights, with_topk=True):
    def loss(hidden, unembedding):
        out = fn(hidden, unembedding, targets, ids if with_topk else None, ref_logp if with_topk else None,
                 temperature=TEMPERATURE, with_entropy=True)
        total = jnp.sum(out.logp * weights[0]) + jnp.sum(out.entropy * weights[1])
        return total + (jnp.sum(out.kl * weights[2]) if with_topk else 0.0)
    return loss


def check_against_reference(fn, seed, dtype, with_topk=True, **sizes):
    """Outputs and gradients of `fn` against the dense oracle on fresh inputs (sizes: make_inputs' n, vocab, k, d)."""
    hidden, unembedding, targets, ids, ref_logp, weights = make_inputs(seed, dtype, **sizes)
    kw = dict(temperature=TEMPERATURE, with_entropy=True)
    topk = (ids, ref_logp) if with_topk else (None, None)
    out = jax.jit(lambda h, w: fn(h, w, targets, *topk, **kw))(hidden, unembedding)
    expected = reference.logprob_kl(hidden, unembedding, targets, *topk, **kw)
    for name in ("logp", "entropy") + (("kl",) if with_topk else ()):
        got = getattr(out, name)
        assert got.dtype == jnp.float32 and got.shape == targets.shape
        assert rel_err(got, getattr(expected, name)) < TOLERANCE[dtype], name
    if not with_topk:
        assert out.kl is None
    loss = weighted_loss(fn, targets, ids, ref_logp, weights, with_topk)
    grads = jax.jit(jax.grad(loss, (0, 1)))(hidden, unembedding)
    expected_grads = jax.grad(weighted_loss(reference.logprob_kl, targets, ids, ref_logp, weights, with_topk),
                              (0, 1))(hidden, unembedding)
    for name, g, e in zip(("dhidden", "dW"), grads, expected_grads):
        assert g.dtype == dtype
        assert rel_err(g, e) < TOLERANCE[dtype], name


def test_reference_matches_float64_numpy():
    hidden, unembedding, targets, ids, ref_logp, _ = make_inputs(0)
    out = reference.logprob_kl(hidden, unembedding, targets, ids, ref_logp, temperature=TEMPERATURE, with_entropy=True)
    for got, want in zip(out, numpy_oracle(hidden, unembedding, targets, ids, ref_logp, TEMPERATURE)):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_xla_matches_reference(dtype):
    check_against_reference(functools.partial(xla.logprob_kl, block_n=8, block_v=32), 1, dtype)


# Interpret mode is slow: the Pallas kernels run at the test sizes (N, V, K = 37, 203, 11: every block and
# the top-K width padded) with the top-K in fp32 and bf16, and once without it (the kernels' other path).
PALLAS = {
    "pallas_gpu": functools.partial(pallas_gpu.logprob_kl, block_n=16, block_v=64, block_d=8, interpret=True),
    "pallas_tpu": functools.partial(pallas_tpu.logprob_kl, block_n=16, block_v=128, interpret=True),
}


@pytest.mark.parametrize("dtype, with_topk", [(jnp.float32, True), (jnp.bfloat16, True), (jnp.float32, False)])
@pytest.mark.parametrize("impl", sorted(PALLAS))
def test_pallas_interpret_matches_reference(impl, dtype, with_topk):
    check_against_reference(PALLAS[impl], 2 if impl == "pallas_gpu" else 3, dtype, with_topk)


def test_pallas_gpu_pads_a_hidden_size_its_chunks_do_not_divide():
    """D 20 in chunks of 8: the hidden size is zero-padded to 24, and dhidden comes back as [N, 20]."""
    check_against_reference(PALLAS["pallas_gpu"], 9, jnp.float32, with_topk=False, n=20, d=20)
    with pytest.raises(ValueError, match="block_d=24 must be a power of two"):
        pallas_gpu.logprob_kl(*make_inputs(9, n=4)[:3], block_d=24)


@pytest.mark.parametrize("impl", ["xla"] + sorted(PALLAS))
def test_topk_equal_to_vocab_is_the_full_kl(impl):
    fn = PALLAS.get(impl, functools.partial(xla.logprob_kl, block_n=8, block_v=16))
    n, vocab = 16, 40
    hidden, unembedding, targets, _, _, _ = make_inputs(4, n=n, vocab=vocab)
    rng = np.random.default_rng(4)
    ref_full = jax.nn.log_softmax(jnp.asarray(rng.standard_normal((n, vocab)), jnp.float32), axis=-1)
    order = jnp.asarray(np.stack([rng.permutation(vocab) for _ in range(n)]), jnp.int32)  # K = V, any order
    out = fn(hidden, unembedding, targets, order, jnp.take_along_axis(ref_full, order, -1), temperature=TEMPERATURE)
    log_p = jax.nn.log_softmax(hidden @ unembedding / TEMPERATURE, axis=-1)
    full_kl = jnp.sum(jnp.exp(log_p) * (log_p - ref_full), axis=-1)
    assert rel_err(out.kl, full_kl) < 1e-5
    assert np.all(np.asarray(out.kl) >= 0)
    # The gradient too, with K = V over a vocabulary no block size divides.
    check_against_reference(fn, 8, jnp.float32, n=n, vocab=vocab, k=vocab)


def test_kl_and_k3_are_nonnegative():
    hidden, unembedding, targets, ids, ref_logp, _ = make_inputs(5)
    out = xla.logprob_kl(hidden, unembedding, targets, ids, ref_logp, temperature=TEMPERATURE, block_v=64)
    assert np.all(np.asarray(out.kl) >= -1e-7)
    ref_target_logp = out.logp + jnp.asarray(np.random.default_rng(5).standard_normal(N), jnp.float32)
    k3 = reference.k3(out.logp, ref_target_logp)
    r = np.asarray(ref_target_logp, np.float64) - np.asarray(out.logp, np.float64)
    assert np.all(np.asarray(k3) >= 0) and rel_err(k3, np.exp(r) - r - 1) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_loss_never_builds_tokens_by_vocab(dtype):
    """Compiled temporary memory of forward+backward: fused is far below the naive logits path, and with
    bf16 params holds no float32 copy of W (XLA:CPU upcasts bf16 slices; see xla._loop_slice)."""
    n, d, vocab = 1024, 256, 16384
    args = (jax.ShapeDtypeStruct((n, d), dtype), jax.ShapeDtypeStruct((d, vocab), dtype),
            jax.ShapeDtypeStruct((n,), jnp.int32))

    def temp_bytes(fn):
        grad = jax.grad(lambda h, w, t: jnp.sum(fn(h, w, t, temperature=1.0).logp), (0, 1))
        return jax.jit(grad).lower(*args).compile().memory_analysis().temp_size_in_bytes

    fused = temp_bytes(functools.partial(xla.logprob_kl, block_n=256, block_v=1024))
    naive = temp_bytes(reference.logprob_kl)
    assert naive >= n * vocab * 4  # the naive path holds at least one [N, V] float32 array
    assert fused < naive / 8 and fused < d * vocab * 4, (fused, naive)


def test_dispatch_and_input_errors():
    assert api.get_impl(None)[0] == "xla"
    assert api.get_impl("pallas")[0] == "xla"  # logged fallback on CPU
    assert api.get_impl("pallas_gpu", interpret=True)[0] == "pallas_gpu"
    assert api.get_impl("pallas_tpu", interpret=True)[0] == "pallas_tpu"
    hidden, unembedding, targets, ids, ref_logp, _ = make_inputs(6, n=16)
    # A top-K request stays on the named Pallas kernel: no fallback to xla.
    out = api.logprob_kl(hidden, unembedding, targets, ids, ref_logp, impl="pallas_gpu", interpret=True)
    assert rel_err(out.kl, reference.logprob_kl(hidden, unembedding, targets, ids, ref_logp).kl) < 1e-5
    with pytest.raises(ValueError, match="both ref_topk_ids and ref_topk_logprobs"):
        api.logprob_kl(hidden, unembedding, targets, ids, None)
    with pytest.raises(ValueError, match=r"must have the same \[N, K\] shape"):
        api.logprob_kl(hidden, unembedding, targets, ids, ref_logp[:, :3])


def test_model_facing_functions_keep_batch_seq_shapes():
    hidden, unembedding, targets, ids, ref_logp, _ = make_inputs(7, n=36)
    shape = lambda x: x.reshape(4, 9, *x.shape[1:])
    out = logprobs.logprobs_entropy_kl(shape(hidden), unembedding, shape(targets), temperature=TEMPERATURE,
                                       ref_topk_ids=shape(ids), ref_topk_logprobs=shape(ref_logp), with_entropy=True)
    expected = reference.logprob_kl(hidden, unembedding, targets, ids, ref_logp, temperature=TEMPERATURE,
                                    with_entropy=True)
    for got, want in zip(out, expected):
        assert got.shape == (4, 9) and rel_err(got.reshape(-1), want) < 1e-5
    token = logprobs.token_logprobs(shape(hidden), unembedding, shape(targets))
    assert rel_err(token.reshape(-1), reference.logprob_kl(hidden, unembedding, targets).logp) < 1e-5
