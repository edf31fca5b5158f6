"""Cross-lowering: compile-side checks of the Pallas kernels for TPU and GPU on a host without either.

`jax.jit(f).trace(*args).lower(lowering_platforms=(platform,))` runs JAX's lowering for another platform
on a CPU host: for a Pallas kernel, the Pallas -> Mosaic lowering ("tpu": block-shape rules, primitives
Mosaic has rules for, MLIR verification) or the Pallas -> Triton lowering ("cuda": power-of-two tiles,
primitives Triton has rules for). What runs only on the device is not covered: Mosaic's layout passes
and Triton's compile to PTX happen inside XLA's compiler there (`benchmarks/device_check.py`).

On top of the lowering, two budgets the device compilers enforce are estimated from the traced program:
  * TPU VMEM: a pallas_call's pipelined blocks (two buffers each) and scratch, padded to (8, 128) tiles,
    against the limit it asks Mosaic for (`vmem_limit_bytes`, else the chip's default scoped limit);
  * GPU registers: the largest value a Triton kernel body holds, in elements.

    register_tpu_chip("v5e")
    traced = trace(fn, args, "tpu")        # fn traced with the TPU kernels (`dispatch.target_platform`)
    lowered = lower(traced, "tpu", "fn")   # CrossLoweringError names the kernels that fail
    problems = vmem_problems(traced.jaxpr, "v5e")
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from alignment_kernels import dispatch

# XLA's default scoped VMEM limit per chip (what a kernel gets without `vmem_limit_bytes`) and the VMEM
# each TensorCore has (`pltpu.get_tpu_info_for_chip(...).vmem_capacity_bytes`, JAX 0.10.2).
TPU_CHIPS = {
    "v5e": dict(version="TPU_V5E", scoped_vmem=16 * 2**20, vmem=128 * 2**20),
    "v5p": dict(version="TPU_V5P", scoped_vmem=16 * 2**20, vmem=64 * 2**20),
    "v6e": dict(version="TPU_V6E", scoped_vmem=32 * 2**20, vmem=128 * 2**20),
}
# A Triton program's register file holds 64K 32-bit values (H100, A100); a tile far beyond that spills to
# local memory or fails for shared memory, so one value of the kernel body is held to a quarter of it.
GPU_MAX_TILE_ELEMENTS = 2**14
# What a pallas_call's pipelined blocks and scratch may take of its VMEM limit; the rest is for the kernel
# body's temporaries (logits tiles and the like).
VMEM_BUFFER_SHARE = 0.75


def register_tpu_chip(chip: str = "v5e") -> None:
    """Make this host's device kind describe TPU `chip`, so the Mosaic lowering can run off a TPU.

    The Mosaic lowering asks `get_tpu_info()` for the chip (sublanes, lanes, generation). Off a TPU it looks
    the device kind up in `jax._src.pallas.mosaic.tpu_info.registry`: a private hook (checked on JAX 0.10.2),
    the only way to name a chip without one. Affects this process's TPU lowerings only.
    """
    from jax._src.pallas.mosaic import tpu_info  # private: see the docstring

    if chip not in TPU_CHIPS:
        raise ValueError(f"register_tpu_chip: unknown chip {chip!r}; choose from {sorted(TPU_CHIPS)}")
    version = getattr(tpu_info.ChipVersion, TPU_CHIPS[chip]["version"])
    kind = jax.devices()[0].device_kind
    if kind in tpu_info.registry and getattr(tpu_info.registry[kind], "chip", None) == chip:
        return
    describe = lambda: tpu_info.get_tpu_info_for_chip(version, 1)
    describe.chip = chip
    tpu_info.registry[kind] = describe
    tpu_info.get_tpu_info.cache_clear()  # an earlier chip's answer is cached


class CrossLoweringError(RuntimeError):
    """A program that does not lower for a platform; the message names the failing kernels and shapes."""


@dataclasses.dataclass(frozen=True)
class KernelCall:
    """One pallas_call of a traced program: its name, operand and result shapes, and the jaxpr equation."""

    name: str
    operands: tuple[str, ...]
    results: tuple[str, ...]
    eqn: Any

    def __str__(self) -> str:
        return f"{self.name}({', '.join(self.operands)}) -> ({', '.join(self.results)})"


def _subjaxprs(value) -> Iterator[Any]:
    """The jaxprs held by one equation parameter (a jaxpr, a closed jaxpr, or a sequence of them)."""
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value, "consts"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _subjaxprs(item)


def kernel_calls(jaxpr) -> list[KernelCall]:
    """Every pallas_call in `jaxpr` (a Jaxpr or ClosedJaxpr), nested ones (scan, shard_map, custom_vjp) too."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    calls = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            shape = lambda v: f"{v.aval.dtype}{list(v.aval.shape)}"
            calls.append(KernelCall(eqn.params.get("name") or "pallas_call", tuple(map(shape, eqn.invars)),
                                    tuple(map(shape, eqn.outvars)), eqn))
            continue
        for value in eqn.params.values():
            for sub in _subjaxprs(value):
                calls.extend(kernel_calls(sub))
    return calls


def _lower_alone(call: KernelCall, platform: str) -> None:
    """Lower one pallas_call by itself (to find which kernel of a failing program fails)."""
    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in call.eqn.invars]
    bind = lambda *args: call.eqn.primitive.bind(*args, **call.eqn.params)
    jax.jit(bind).trace(*avals).lower(lowering_platforms=(platform,))


def trace(fn: Callable, args: Sequence[Any], platform: str, **kwargs) -> jax.stages.Traced:
    """`fn` (a fresh `jax.jit` of it, unless it is jitted already) traced with `platform`'s kernels."""
    jitted = fn if hasattr(fn, "trace") else jax.jit(fn)
    with dispatch.target_platform(platform):
        return jitted.trace(*args, **kwargs)


def lower(traced: jax.stages.Traced, platform: str, what: str = "program") -> jax.stages.Lowered:
    """Lower a program `trace` traced for `platform`. CrossLoweringError names each kernel that fails to
    lower by itself, with its operand and result shapes."""
    try:
        return traced.lower(lowering_platforms=(platform,))
    except Exception as error:  # noqa: BLE001 (any lowering failure is reported with the kernels named)
        failing = []
        for call in kernel_calls(traced.jaxpr):
            try:
                _lower_alone(call, platform)
            except Exception as kernel_error:  # noqa: BLE001
                failing.append(f"  {call}: {type(kernel_error).__name__}: {kernel_error}")
        where = "\n".join(failing) or f"  (no kernel fails alone) {type(error).__name__}: {error}"
        raise CrossLoweringError(f"{what} does not lower for {platform}:\n{where}") from error


def expect_kernels(lowered: jax.stages.Lowered, platform: str) -> int:
    """The number of `platform` kernel calls in a lowered module; AssertionError if there are none or the
    other platform's (a program traced for the host, e.g. from a jit cache, would show it here)."""
    text = lowered.as_text()
    tpu, gpu = text.count("tpu_custom_call"), text.count("__gpu$xla.gpu.triton")
    ours, theirs = (tpu, gpu) if platform == "tpu" else (gpu, tpu)
    assert ours > 0 and theirs == 0, f"lowered for {platform}: {tpu} Mosaic and {gpu} Triton kernel calls"
    return ours


def _tiled_bytes(shape: Sequence[int], dtype) -> int:
    """VMEM bytes of an array: the last two dims padded to (8 * packing, 128) tiles (bf16 packs 2 rows)."""
    itemsize = np.dtype(dtype).itemsize
    shape = (1, 1, *shape)
    sublanes = 8 * max(1, 4 // itemsize)
    rows, lanes = -(-shape[-2] // sublanes) * sublanes, -(-shape[-1] // 128) * 128
    return math.prod(shape[:-2]) * rows * lanes * itemsize


def vmem_buffer_bytes(call: KernelCall) -> int:
    """VMEM a TPU pallas_call's pipeline holds: two buffers per input and output block, plus scratch."""
    grid_mapping = call.eqn.params["grid_mapping"]
    blocks = sum(2 * _tiled_bytes(bm.block_aval.shape, bm.array_aval.dtype) for bm in grid_mapping.block_mappings)
    kernel_inputs = call.eqn.params["jaxpr"].invars
    scratch = kernel_inputs[len(kernel_inputs) - grid_mapping.num_scratch_operands:]
    return blocks + sum(_tiled_bytes(v.aval.shape, v.aval.dtype) for v in scratch)


def vmem_limit(call: KernelCall, chip: str) -> int:
    """The VMEM limit Mosaic compiles `call` under on `chip`: its own `vmem_limit_bytes`, else the default."""
    asked = getattr(call.eqn.params.get("compiler_params"), "vmem_limit_bytes", None)
    return asked or TPU_CHIPS[chip]["scoped_vmem"]


def vmem_problems(jaxpr, chip: str = "v5e") -> list[str]:
    """TPU kernels of `jaxpr` whose buffers exceed their share of the VMEM limit, or whose limit the chip
    does not have; empty when every kernel fits."""
    problems = []
    for call in kernel_calls(jaxpr):
        need, limit = vmem_buffer_bytes(call), vmem_limit(call, chip)
        if need > VMEM_BUFFER_SHARE * limit or limit > TPU_CHIPS[chip]["vmem"]:
            problems.append(f"{call}: buffers {need / 2**20:.1f} MiB, VMEM limit {limit / 2**20:.0f} MiB on {chip}")
    return problems


def largest_tile(call: KernelCall) -> int:
    """Elements of the largest value the kernel body computes (a Triton kernel keeps them in registers)."""
    def values(jaxpr) -> Iterator[int]:
        for eqn in jaxpr.eqns:
            for v in eqn.outvars:
                yield math.prod(getattr(v.aval, "shape", ()))
            for value in eqn.params.values():
                for sub in _subjaxprs(value):
                    yield from values(sub)

    return max(values(call.eqn.params["jaxpr"]), default=0)


def register_problems(jaxpr) -> list[str]:
    """GPU kernels of `jaxpr` holding a value above GPU_MAX_TILE_ELEMENTS; empty when none does."""
    return [f"{call}: a {largest_tile(call)}-element tile" for call in kernel_calls(jaxpr)
            if largest_tile(call) > GPU_MAX_TILE_ELEMENTS]
