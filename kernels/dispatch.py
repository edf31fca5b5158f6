"""Choosing an implementation of a kernel op by name and backend (shared by every op's api.py)."""
from __future__ import annotations

import functools
from typing import Callable, Mapping

import jax
from absl import logging

# The implementation each backend gets when none is named.
BACKEND_DEFAULT = {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu"}
# Implementations that only compile for one backend (everything else runs everywhere).
NATIVE_BACKEND = {"pallas_tpu": ("tpu",), "pallas_gpu": ("gpu", "cuda", "rocm"), "cudnn": ("gpu", "cuda")}


@functools.cache
def _log_fallback_once(op: str, requested: str, backend: str, chosen: str) -> None:
    logging.warning("kernels.%s: %r cannot run on backend %r; falling back to %r", op, requested, backend, chosen)


def pick(op: str, name: str | None, impls: Mapping[str, Callable], *, interpret: bool = False,
         fallback: str = "xla") -> tuple[str, Callable]:
    """(chosen name, function) for `name` (None: the backend default; "pallas": this backend's Pallas).

    A Pallas implementation on a backend it cannot compile for runs in interpret mode when
    `interpret` is set (tests), and otherwise falls back to `fallback` with a warning logged once.
    """
    backend = jax.default_backend()
    if name is None:
        name = BACKEND_DEFAULT.get(backend, fallback)
    elif name == "pallas":  # whichever Pallas flavour this backend has
        name = "pallas_tpu" if backend == "tpu" else "pallas_gpu"
    if name not in impls:
        raise ValueError(f"kernels.{op}: unknown implementation {name!r}; choose from {sorted(impls)}")
    native = NATIVE_BACKEND.get(name)
    if native is None or backend in native:
        return name, impls[name]
    if interpret and name.startswith("pallas"):
        return name, functools.partial(impls[name], interpret=True)
    _log_fallback_once(op, name, backend, fallback)
    return fallback, impls[fallback]
