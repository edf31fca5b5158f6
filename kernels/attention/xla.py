"""Blockwise (flash) attention in pure JAX: memory linear in sequence length, any backend.

The forward pass scans key/value blocks with an online softmax (running max `m`, running sum `l`),
keeping only [batch, heads, q_len, block_k] scores alive. The custom VJP stores the output and the
log-sum-exp per query and recomputes each block's probabilities in the backward scan, so no
[q_len, kv_len] array exists in either direction.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DEFAULT_BLOCK_K = 512


def _pad_kv(x, length, value=0):
    pad = length - x.shape[1]
    return x if pad == 0 else jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)


def _kv_blocks(x, block_k):
    """[batch, kv_len, ...] -> [num_blocks, batch, block_k, ...] for scanning."""
    b, n = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, n // block_k, block_k, *x.shape[2:]), 1, 0)


def _block_mask(q_seg, q_pos, k_seg, k_pos):
    """[batch, 1, 1, q_len, block_k] (broadcasts over kv heads and groups)."""
    m = (q_seg[:, :, None] == k_seg[:, None, :]) & (q_seg != 0)[:, :, None] & (k_pos[:, None, :] <= q_pos[:, :, None])
    return m[:, None, None]


def _scores(q5, k_blk, scale):
    """q5 [b, q, kvh, g, dh], k_blk [b, bk, kvh, dh] -> [b, kvh, g, q, bk] float32."""
    return jnp.einsum("bqhgd,bkhd->bhgqk", q5, k_blk, preferred_element_type=jnp.float32) * scale


def _forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, block_k):
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    scale = head_dim ** -0.5
    block_k = min(block_k, k.shape[1])
    kv_len = -(-k.shape[1] // block_k) * block_k
    # Padded keys get segment 0, which no real query matches.
    ks, vs, kss, kps = (_kv_blocks(_pad_kv(x, kv_len), block_k) for x in (k, v, kv_seg, kv_pos))
    q5 = q.reshape(batch, q_len, kv_heads, groups, head_dim)

    def step(carry, blk):
        m, l, acc = carry
        k_blk, v_blk, seg_blk, pos_blk = blk
        allowed = _block_mask(q_seg, q_pos, seg_blk, pos_blk)
        s = _scores(q5, k_blk, scale)
        m_new = jnp.maximum(m, jnp.max(jnp.where(allowed, s, -jnp.inf), axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing allowed yet
        p = jnp.where(allowed, jnp.exp(s - m_safe[..., None]), 0.0)
        correction = jnp.exp(m - m_safe)
        l = l * correction + jnp.sum(p, axis=-1)
        pv = jnp.einsum("bhgqk,bkhd->bhgqd", p.astype(v.dtype), v_blk, preferred_element_type=jnp.float32)
        return (m_new, l, acc * correction[..., None] + pv), None

    shape = (batch, kv_heads, groups, q_len)
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape + (head_dim,), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(step, init, (ks, vs, kss, kps))
    has_keys = l > 0
    out = acc / jnp.where(has_keys, l, 1.0)[..., None]  # padding rows: acc is 0, so out is 0
    lse = jnp.where(has_keys, m + jnp.log(jnp.where(has_keys, l, 1.0)), 0.0)  # [b, kvh, g, q]
    out = jnp.moveaxis(out, 3, 1).reshape(batch, q_len, heads, head_dim).astype(q.dtype)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, q_seg, kv_seg, q_pos, kv_pos, block_k):
    return _forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, block_k)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, q_pos, kv_pos, block_k):
    out, lse = _forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, block_k)
    return out, (q, k, v, q_seg, kv_seg, q_pos, kv_pos, out, lse)


def _flash_bwd(block_k, residuals, d_out):
    q, k, v, q_seg, kv_seg, q_pos, kv_pos, out, lse = residuals
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    scale = head_dim ** -0.5
    block_k = min(block_k, kv_len)
    padded = -(-kv_len // block_k) * block_k
    ks, vs, kss, kps = (_kv_blocks(_pad_kv(x, padded), block_k) for x in (k, v, kv_seg, kv_pos))
    q5 = q.reshape(batch, q_len, kv_heads, groups, head_dim)
    do5 = d_out.reshape(q5.shape)
    # delta_i = sum_j P_ij dP_ij = <out_i, dout_i>: the softmax-backward correction per query.
    delta = jnp.einsum("bqhgd,bqhgd->bhgq", out.reshape(q5.shape).astype(jnp.float32), do5.astype(jnp.float32))

    def step(dq, blk):
        k_blk, v_blk, seg_blk, pos_blk = blk
        allowed = _block_mask(q_seg, q_pos, seg_blk, pos_blk)
        p = jnp.where(allowed, jnp.exp(_scores(q5, k_blk, scale) - lse[..., None]), 0.0)
        dv = jnp.einsum("bhgqk,bqhgd->bkhd", p.astype(do5.dtype), do5, preferred_element_type=jnp.float32)
        dp = jnp.einsum("bqhgd,bkhd->bhgqk", do5, v_blk, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[..., None]) * scale).astype(q.dtype)
        dq = dq + jnp.einsum("bhgqk,bkhd->bqhgd", ds, k_blk, preferred_element_type=jnp.float32)
        dk = jnp.einsum("bhgqk,bqhgd->bkhd", ds, q5, preferred_element_type=jnp.float32)
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(q5.shape, jnp.float32), (ks, vs, kss, kps))
    unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(batch, padded, kv_heads, head_dim)[:, :kv_len]
    return (dq.reshape(q.shape).astype(q.dtype), unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype),
            None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *,
              block_k: int = DEFAULT_BLOCK_K) -> jax.Array:
    """Same contract as `reference.attention`; any kv_len (the last block is padded)."""
    return _flash(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, block_k)
