"""Fused output-head log-probs / entropy / top-K KL by implementation name, chosen per backend.

Names: "reference" (materialises [N, V]; tests only), "xla" (blockwise, the CPU default),
"pallas_gpu", "pallas_tpu", "pallas" (this backend's flavour). Every implementation computes all three
outputs; the only logged fallback is a Pallas kernel named on a backend it cannot compile for
(`alignment_kernels.dispatch.pick`).
"""
from __future__ import annotations

from typing import Callable

from alignment_kernels import dispatch
from alignment_kernels.logprob_kl import pallas_gpu, pallas_tpu, reference, xla
from alignment_kernels.logprob_kl.reference import LogprobKL

IMPLEMENTATIONS: dict[str, Callable[..., LogprobKL]] = {
    "reference": reference.logprob_kl,
    "xla": xla.logprob_kl,
    "pallas_gpu": pallas_gpu.logprob_kl,
    "pallas_tpu": pallas_tpu.logprob_kl,
}


def get_impl(name: str | None = None, *, interpret: bool = False) -> tuple[str, Callable]:
    """(chosen name, fn(hidden, unembedding, targets, ref_topk_ids, ref_topk_logprobs, *, temperature,
    with_entropy))."""
    return dispatch.pick("logprob_kl", name, IMPLEMENTATIONS, interpret=interpret)


def logprob_kl(hidden, unembedding, targets, ref_topk_ids=None, ref_topk_logprobs=None, *,
               temperature: float = 1.0, with_entropy: bool = False, impl: str | None = None,
               interpret: bool = False) -> LogprobKL:
    """hidden [N, D], unembedding [D, V], targets [N]; optional ref_topk_ids / ref_topk_logprobs [N, K].

    Returns LogprobKL(logp [N], entropy [N] | None, kl [N] | None), all float32.
    """
    if (ref_topk_ids is None) != (ref_topk_logprobs is None):
        raise ValueError("logprob_kl: give both ref_topk_ids and ref_topk_logprobs, or neither")
    if ref_topk_ids is not None and ref_topk_ids.shape != ref_topk_logprobs.shape:
        raise ValueError(f"logprob_kl: ref_topk_ids {ref_topk_ids.shape} and ref_topk_logprobs "
                         f"{ref_topk_logprobs.shape} must have the same [N, K] shape")
    _, fn = get_impl(impl, interpret=interpret)
    return fn(hidden, unembedding, targets, ref_topk_ids, ref_topk_logprobs,
              temperature=temperature, with_entropy=with_entropy)
