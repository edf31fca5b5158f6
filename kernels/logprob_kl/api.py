"""Fused output-head log-probs / entropy / top-K KL by implementation name, chosen per backend.

Names: "reference" (materialises [N, V]; tests only), "xla" (blockwise, the CPU default),
"pallas_gpu", "pallas_tpu", "pallas" (this backend's flavour). The Pallas kernels compute log-probs
and entropy; a request with the reference top-K (the KL) runs on "xla", logged once.
"""
from __future__ import annotations

import functools
from typing import Callable

from absl import logging

from kernels import dispatch
from kernels.logprob_kl import pallas_gpu, pallas_tpu, reference, xla
from kernels.logprob_kl.reference import LogprobKL

IMPLEMENTATIONS: dict[str, Callable[..., LogprobKL]] = {
    "reference": reference.logprob_kl,
    "xla": xla.logprob_kl,
    "pallas_gpu": pallas_gpu.logprob_kl,
    "pallas_tpu": pallas_tpu.logprob_kl,
}


@functools.cache
def _log_topk_fallback(name: str) -> None:
    logging.warning("kernels.logprob_kl: %r has no top-K KL; running the request with the reference top-K on 'xla'", name)


def get_impl(name: str | None = None, *, interpret: bool = False, with_topk: bool = False) -> tuple[str, Callable]:
    """(chosen name, fn(hidden, unembedding, targets, ref_topk_ids, ref_topk_logprobs, *, temperature, with_entropy))."""
    chosen, fn = dispatch.pick("logprob_kl", name, IMPLEMENTATIONS, interpret=interpret)
    if with_topk and chosen.startswith("pallas"):
        _log_topk_fallback(chosen)
        return "xla", IMPLEMENTATIONS["xla"]
    return chosen, fn


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
    _, fn = get_impl(impl, interpret=interpret, with_topk=ref_topk_ids is not None)
    return fn(hidden, unembedding, targets, ref_topk_ids, ref_topk_logprobs,
              temperature=temperature, with_entropy=with_entropy)
