"""What the Pallas attention kernels share: per-block math, and the custom-VJP wrapper that pads,
transposes to the kernels' [batch, heads, seq, head_dim] layout and back.

A kernel backend supplies two functions on padded, head-major arrays:
  forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos) -> (out [b, h, Lq, dh], lse [b, h, Lq] float32)
  backward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, lse, d_out, delta) -> (dq, dk, dv)
with delta = sum(out * d_out, -1) [b, h, Lq] float32.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# A large finite negative instead of -inf keeps exp() and max() free of inf - inf on every backend.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def block_mask(q_seg, q_pos, k_seg, k_pos):
    """q_seg, q_pos [bq, 1]; k_seg, k_pos [1, bk] -> [bq, bk] bool."""
    return (q_seg == k_seg) & (q_seg != 0) & (k_pos <= q_pos)


def online_softmax_step(m, l, acc, s, allowed, v):
    """One key block of the flash forward. m, l [bq, 1]; acc [bq, dh] float32; s [bq, bk] scaled scores."""
    s = jnp.where(allowed, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
    p = jnp.where(allowed, jnp.exp(s - m_new), 0.0)
    correction = jnp.exp(m - m_new)
    l = l * correction + jnp.sum(p, axis=-1, keepdims=True)
    acc = acc * correction + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l, acc


def finish(m, l, acc):
    """(out [bq, dh] float32, lse [bq, 1]); rows without any allowed key give out 0 and lse 0."""
    has_keys = l > 0
    safe_l = jnp.where(has_keys, l, 1.0)
    return acc / safe_l, jnp.where(has_keys, m + jnp.log(safe_l), 0.0)


def block_grads(q, k, v, d_out, lse, delta, allowed, scale):
    """Recomputed probabilities of one (query block, key block) pair and its gradient pieces.

    q, d_out [bq, dh]; k, v [bk, dh]; lse, delta [bq, 1]. Returns (p, ds) [bq, bk] float32, where
    ds is the score gradient already multiplied by `scale`.
    """
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
    p = jnp.where(allowed, jnp.exp(s - lse), 0.0)
    dp = jnp.dot(d_out, v.T, preferred_element_type=jnp.float32)
    return p, p * (dp - delta) * scale


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_seq(x, length):
    """Pad axis 1 of x [batch, seq, ...] with zeros (segment 0 = padding) to `length`."""
    pad = length - x.shape[1]
    return x if pad == 0 else jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))


def make_attention(forward: Callable, backward: Callable, block: int) -> Callable:
    """The model-facing attention fn (model layout [b, s, h, dh], any lengths) around two kernel fns.

    Both lengths are padded to multiples of `block` with segment 0, so padded keys are never
    attended and padded queries are dropped on return. Padding and transposes differentiate by
    plain autodiff; the custom VJP covers only the kernels.
    """

    @jax.custom_vjp
    def core(q, k, v, q_seg, kv_seg, q_pos, kv_pos):
        return forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos)[0]

    def core_fwd(q, k, v, q_seg, kv_seg, q_pos, kv_pos):
        out, lse = forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos)
        return out, (q, k, v, q_seg, kv_seg, q_pos, kv_pos, out, lse)

    def core_bwd(residuals, d_out):
        *inputs, out, lse = residuals
        delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)
        return (*backward(*inputs, lse, d_out.astype(out.dtype), delta), None, None, None, None)

    core.defvjp(core_fwd, core_bwd)

    def attention(q, k, v, q_seg, kv_seg, q_pos, kv_pos):
        lq, lk = _round_up(q.shape[1], block), _round_up(k.shape[1], block)
        head_major = lambda x, n: jnp.swapaxes(_pad_seq(x, n), 1, 2)
        out = core(head_major(q, lq), head_major(k, lk), head_major(v, lk),
                   _pad_seq(q_seg, lq), _pad_seq(kv_seg, lk), _pad_seq(q_pos, lq), _pad_seq(kv_pos, lk))
        return jnp.swapaxes(out, 1, 2)[:, :q.shape[1]]

    return attention
