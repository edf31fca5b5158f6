"""Every Pallas kernel lowered for TPU (Mosaic) and GPU (Triton) on this CPU host, forward and backward.

Lowering only: nothing is compiled or run for the foreign platform (`kernels/lowering.py` says what that
checks and what it cannot). Shapes are the realistic ones (lowering costs the same at any size) plus ones
no block divides; TPU calls are also held to their VMEM limit and GPU tiles to the register bound.
"""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import pytest

from alignment_kernels import dispatch, lowering
from alignment_kernels.attention import api as attention_api
from alignment_kernels.logprob_kl import api as logprob_api
from alignment_kernels.logprob_kl import pallas_tpu as logprob_tpu
from alignment_kernels.logprob_kl.reference import k3

PLATFORMS = ("tpu", "cuda")
DTYPES = (jnp.bfloat16, jnp.float32)
# (batch, seq, heads, kv_heads): Llama-3 8B's 32/8 heads at seq 4096, and a packed row no block divides.
ATTENTION_SHAPES = ((1, 4096, 32, 8), (2, 1000, 8, 2))
# (N, D, V, K): the Llama-3 8B head with the default K; Qwen2-0.5B's head (D 896, V 151936) with the paper's
# K 500 and N no block divides; a 70B-sized head (D 8192) with logp only.
LOGPROB_SHAPES = ((16384, 4096, 128256, 64), (1000, 896, 151936, 500), (4096, 8192, 128256, 0))


@pytest.fixture(scope="module", autouse=True)
def tpu_chip():
    lowering.register_tpu_chip("v5e")


def spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def check_lowers(fn, args, platform, what):
    """Lower fn(*args) for platform; its kernels must be there and within the VMEM / register budgets."""
    traced = lowering.trace(fn, args, platform)
    lowering.expect_kernels(lowering.lower(traced, platform, what), platform)
    problems = lowering.vmem_problems(traced.jaxpr) if platform == "tpu" else lowering.register_problems(traced.jaxpr)
    assert not problems, f"{what} on {platform}:\n" + "\n".join(problems)


def attention_case(shape, head_dim, dtype, backward):
    batch, seq, heads, kv_heads = shape
    args = (spec((batch, seq, heads, head_dim), dtype), spec((batch, seq, kv_heads, head_dim), dtype),
            spec((batch, seq, kv_heads, head_dim), dtype)) + (spec((batch, seq), jnp.int32),) * 4
    fn = functools.partial(attention_api.attention, impl="pallas")
    if backward:
        fn = jax.grad(lambda q, k, v, *vectors: jnp.sum(
            attention_api.attention(q, k, v, *vectors, impl="pallas").astype(jnp.float32)), (0, 1, 2))
    return fn, args


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("platform", PLATFORMS)
def test_attention_lowers(platform, dtype, backward):
    for shape, head_dim in itertools.product(ATTENTION_SHAPES, (64, 128)):
        fn, args = attention_case(shape, head_dim, dtype, backward)
        what = (f"attention {'backward' if backward else 'forward'} {jnp.dtype(dtype).name} batch, seq, heads, "
                f"kv_heads {shape} head_dim {head_dim}")
        check_lowers(fn, args, platform, what)


def logprob_case(shape, dtype, backward, kl):
    """The fused head with the top-K KL (kl='top_k') or the logp + entropy a k3 loss uses (kl='k3')."""
    n, d, vocab, k = shape
    args = [spec((n, d), dtype), spec((d, vocab), dtype), spec((n,), jnp.int32)]
    if kl == "top_k":
        args += [spec((n, k), jnp.int32), spec((n, k), jnp.float32)]
    else:
        args += [spec((n,), jnp.float32)]  # the reference's log-probs of the sampled tokens

    def loss(hidden, unembedding, targets, *extra):
        topk = extra if kl == "top_k" else (None, None)
        out = logprob_api.logprob_kl(hidden, unembedding, targets, *topk, temperature=0.7, with_entropy=True,
                                     impl="pallas")
        kl_term = out.kl if kl == "top_k" else k3(out.logp, extra[0])
        return jnp.sum(out.logp) + jnp.sum(out.entropy) + jnp.sum(kl_term)

    return (jax.grad(loss, (0, 1)) if backward else loss), args


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("platform", PLATFORMS)
def test_logprob_kl_lowers(platform, dtype, backward):
    for shape in LOGPROB_SHAPES:
        for kl in ("top_k", "k3") if shape[3] else ("k3",):
            fn, args = logprob_case(shape, dtype, backward, kl)
            what = (f"logprob_kl ({kl}) {'backward' if backward else 'forward'} {jnp.dtype(dtype).name} "
                    f"N, D, V, K {shape}")
            check_lowers(fn, args, platform, what)


def test_target_platform_picks_the_foreign_kernels_on_this_host():
    assert jax.default_backend() == "cpu"
    with dispatch.target_platform("tpu"):
        assert attention_api.get_impl(None)[0] == "pallas_tpu"
        assert attention_api.get_impl("pallas")[0] == "pallas_tpu"
        assert attention_api.get_impl("cudnn")[0] == "xla"  # logged fallback: no cuDNN on a TPU
        with dispatch.target_platform("cuda"):
            assert logprob_api.get_impl("pallas")[0] == "pallas_gpu"
        assert logprob_api.get_impl(None)[0] == "pallas_tpu"
    assert attention_api.get_impl(None)[0] == "xla"
    with pytest.raises(ValueError, match="'metal' has no kernels"):
        with dispatch.target_platform("metal"):
            pass


def test_a_kernel_that_does_not_lower_is_named_with_its_shapes():
    """A TPU block that breaks Mosaic's (8, 128) rule: the error names the kernel and its operand shapes."""
    fn = functools.partial(attention_api.IMPLEMENTATIONS["pallas_tpu"],
                           blocks=attention_api.pallas_tpu.BlockSizes(block_q=100, block_k=100))
    _, args = attention_case((1, 200, 4, 2), 64, jnp.float32, False)
    traced = lowering.trace(fn, args, "tpu")
    with pytest.raises(lowering.CrossLoweringError, match=r"attention_forward\(int32\[1, 200, 128\].*divisible by 8"):
        lowering.lower(traced, "tpu", "attention with 100-row blocks")


def test_tpu_logprob_blocks_shrink_to_fit_vmem():
    assert logprob_tpu.block_sizes(256, 512, 896, 2, 0) == (256, 512)  # small heads keep the requested blocks
    assert logprob_tpu.block_sizes(256, 512, 4096, 2, 64) == (256, 256)
    assert logprob_tpu.block_sizes(256, 512, 8192, 4, 0) == (32, 128)
    for d, itemsize in ((4096, 2), (8192, 2), (8192, 4)):
        assert logprob_tpu.vmem_bytes(*logprob_tpu.block_sizes(256, 512, d, itemsize, 64), d, itemsize, 64) \
            <= logprob_tpu.VMEM_BUDGET
    with pytest.raises(ValueError, match="hidden size 16384 .* does not fit"):
        logprob_tpu.block_sizes(256, 512, 16384, 4, 0)
