"""Weight matmuls in the compute dtype, accumulated in float32, in the forward and in the backward pass.

`project(spec, x, w)` is `einsum(spec, x, w)` for a two-operand spec in which every index of one operand also
appears in the other or in the output (the model's projections: "bsd,dhk->bshk", "bsf,fd->bsd", ...). The
weight w (parameter dtype, e.g. float32) is cast to x's dtype.

In float32 it is the plain einsum. In a low-precision dtype (bfloat16) its gradient is written out: JAX's own
transpose of a float32-accumulating einsum multiplies a float32 cotangent, so XLA runs both gradient matmuls
in float32, and a bf16 x bf16 -> bf16 dot is upcast to float32 on XLA:CPU too. Here all three matmuls take
bf16 inputs and accumulate in float32 (what bf16 hardware and autocast do), about 2x the float32 rate on a
CPU with AVX512-BF16. The weight gradient is returned in w's dtype, unrounded.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def project(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum(spec, x, w.astype(x.dtype)) in x's dtype, with float32 accumulation when x is low precision."""
    if x.dtype == jnp.float32:
        return jnp.einsum(spec, x, w.astype(x.dtype))
    return _low_precision_einsum(spec, x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _low_precision_einsum(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def _forward(spec, x, w):
    return _low_precision_einsum(spec, x, w), (x, w)


def _backward(spec, residuals, g):
    x, w = residuals
    inputs, out = spec.split("->")
    x_spec, w_spec = inputs.split(",")
    g = g.astype(x.dtype)
    dx = jnp.einsum(f"{out},{w_spec}->{x_spec}", g, w.astype(x.dtype), preferred_element_type=jnp.float32)
    dw = jnp.einsum(f"{x_spec},{out}->{w_spec}", x, g, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_low_precision_einsum.defvjp(_forward, _backward)
