"""Choosing an implementation of a kernel op by name and backend (shared by every op's api.py)."""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Callable, Iterator, Mapping

import jax
from absl import logging

# The implementation each backend gets when none is named.
BACKEND_DEFAULT = {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu"}
# Implementations that only compile for one backend (everything else runs everywhere).
NATIVE_BACKEND = {"pallas_tpu": ("tpu",), "pallas_gpu": ("gpu", "cuda", "rocm"), "cudnn": ("gpu", "cuda")}


# The platform a program is being traced for, when it differs from the host's (see `target_platform`).
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("kernels_target_platform", default=None)


@contextlib.contextmanager
def target_platform(platform: str) -> Iterator[None]:
    """Pick implementations for `platform` ("tpu", "cuda", "rocm") instead of the host's backend.

    For cross-lowering: a program traced inside this context on a CPU host contains the TPU or GPU
    kernels (not interpret mode, not the fallback) and is meant for
    `jax.jit(f).trace(*args).lower(lowering_platforms=(platform,))`; it cannot run on the host.
    Implementations are picked when a program is traced, so trace it inside the context (a jitted
    function already traced for the host keeps its cached choice: trace a fresh `jax.jit`).
    """
    if platform not in BACKEND_DEFAULT:
        raise ValueError(f"target_platform: {platform!r} has no kernels; choose from {sorted(BACKEND_DEFAULT)}")
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def current_backend() -> str:
    """The backend implementations are picked for: `target_platform`'s, else JAX's default backend."""
    return _TARGET.get() or jax.default_backend()


@functools.cache
def _log_fallback_once(op: str, requested: str, backend: str, chosen: str) -> None:
    logging.warning("alignment_kernels.%s: %r cannot run on backend %r; falling back to %r",
                    op, requested, backend, chosen)


def pick(op: str, name: str | None, impls: Mapping[str, Callable], *, interpret: bool = False,
         fallback: str = "xla") -> tuple[str, Callable]:
    """(chosen name, function) for `name` (None: the backend default; "pallas": this backend's Pallas).

    A Pallas implementation on a backend it cannot compile for runs in interpret mode when
    `interpret` is set (tests), and otherwise falls back to `fallback` with a warning logged once.
    """
    backend = current_backend()
    if name is None:
        name = BACKEND_DEFAULT.get(backend, fallback)
    elif name == "pallas":  # whichever Pallas flavour this backend has
        name = "pallas_tpu" if backend == "tpu" else "pallas_gpu"
    if name not in impls:
        raise ValueError(f"alignment_kernels.{op}: unknown implementation {name!r}; choose from {sorted(impls)}")
    native = NATIVE_BACKEND.get(name)
    if native is None or backend in native:
        return name, impls[name]
    if interpret and name.startswith("pallas"):
        return name, functools.partial(impls[name], interpret=True)
    _log_fallback_once(op, name, backend, fallback)
    return fallback, impls[fallback]
