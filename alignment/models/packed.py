"""Kernels packed for the CPU decode matmul (`alignment_kernels.cpu_decode`), as a pytree node the model's
projections understand.

Only the rollout engine makes them, in its own copy of the weights (`pack_for_decode`), and only where the kernel
runs (CPU with AVX512-BF16, bfloat16 compute): a decode step's projections then read the weights near the
memory's rate instead of XLA:CPU's ~20 GB/s for a few rows. Prefill chunks (many rows, compute-bound) unpack the
kernel inside the program and take XLA's matmul.
"""
from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from alignment_kernels.cpu_decode import api as cpu_decode


class Packed(flax.struct.PyTreeNode):
    """A kernel [*in, *out] as `cpu_decode.pack` lays it out: data bf16 [N/64, K/2, 64, 2], K = prod(in),
    N = prod(out)."""

    data: jax.Array
    in_shape: tuple = flax.struct.field(pytree_node=False)
    out_shape: tuple = flax.struct.field(pytree_node=False)

    @classmethod
    def of(cls, kernel: jax.Array, input_axes: int) -> Packed:
        in_shape, out_shape = tuple(kernel.shape[:input_axes]), tuple(kernel.shape[input_axes:])
        return cls(cpu_decode.pack(kernel.reshape(math.prod(in_shape), math.prod(out_shape))), in_shape, out_shape)

    def apply(self, x: jax.Array) -> jax.Array:
        """x [..., *in] bfloat16 -> x @ kernel [..., *out] float32 (float32 sums)."""
        if x.dtype != jnp.bfloat16 or x.shape[x.ndim - len(self.in_shape):] != self.in_shape:
            raise ValueError(f"a packed kernel takes bfloat16 [..., {', '.join(map(str, self.in_shape))}]; "
                             f"got {x.dtype} {x.shape}")
        lead = x.shape[: x.ndim - len(self.in_shape)]
        m, k, n = math.prod(lead), math.prod(self.in_shape), math.prod(self.out_shape)
        x = x.reshape(m, k)
        if m <= cpu_decode.MAX_ROWS:
            y = cpu_decode.matmul(x, self.data, n)
        else:
            y = jnp.dot(x, cpu_decode.unpack(self.data, n)[:k], preferred_element_type=jnp.float32)
        return y.reshape(*lead, *self.out_shape)


def pack_for_decode(params: Any, layers: tuple, projections: dict[str, int]) -> tuple[Any, tuple]:
    """(params, per-layer weights) with the head and every layer's projections (name -> input axes) packed."""
    pack_layer = lambda layer: {name: Packed.of(w, projections[name]) if name in projections else w
                                for name, w in layer.items()}
    if "lm_head" in params:
        params = {**params, "lm_head": Packed.of(params["lm_head"], 1)}
    return params, tuple(pack_layer(layer) for layer in layers)
