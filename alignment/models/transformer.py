"""The decoder: Llama-2, Llama-3/3.1 and Qwen2 in one Flax module.

Flax declares the parameters (with logical axis names for sharding); the forward pass is plain
functions of those arrays, so the layer stack is one `lax.scan` over layer groups with
`jax.checkpoint` around each group of `remat_group_size` layers. Layer parameters are stacked with a
leading `[num_layers]` axis whatever the grouping, so checkpoints do not depend on it.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alignment.models.attention import get_attention
from alignment.models.config import ModelConfig
from alignment.models.lora import project
from alignment.models.sequence_parallel import with_sequence_parallelism
from alignment.sharding import constrain

Params = Any

# name -> (shape from config, logical axes); every layer parameter gets a leading 'layers' axis.
def _layer_param_specs(c: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    d, h, kv, dh, f = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    specs = {
        "attn_norm": ((d,), ("norm",)),
        "q_proj": ((d, h, dh), ("embed", "heads", "head_dim")),
        "k_proj": ((d, kv, dh), ("embed", "kv_heads", "head_dim")),
        "v_proj": ((d, kv, dh), ("embed", "kv_heads", "head_dim")),
        "o_proj": ((h, dh, d), ("heads", "head_dim", "embed")),
        "mlp_norm": ((d,), ("norm",)),
        "gate_proj": ((d, f), ("embed", "mlp")),
        "up_proj": ((d, f), ("embed", "mlp")),
        "down_proj": ((f, d), ("mlp", "embed")),
    }
    if c.qkv_bias:
        specs.update(
            q_bias=((h, dh), ("heads", "head_dim")),
            k_bias=((kv, dh), ("kv_heads", "head_dim")),
            v_bias=((kv, dh), ("kv_heads", "head_dim")),
        )
    return specs


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def rope_inverse_frequencies(c: ModelConfig) -> np.ndarray:
    """[head_dim // 2] float32 inverse frequencies, with linear or Llama-3.1 scaling, computed on the host.

    The steps are transformers' float32 ones (the frequencies checkpoints were trained with), each power
    evaluated in float64 and rounded once to float32. Built inside compiled code instead, they were folded by
    XLA, which rounds differently: some frequencies one ulp off transformers', so angles off by position x ulp
    and a logit error growing with position (1.4e-4 at 4,096 positions on the llama3 model of tests/test_hf.py).
    """
    f32 = np.float32
    exponents = np.arange(0, c.head_dim, 2).astype(f32) / f32(c.head_dim)
    inv = f32(1.0) / (float(f32(c.rope_theta)) ** exponents.astype(np.float64)).astype(f32)
    s = c.rope_scaling
    if s is None:
        return inv
    if s.type == "linear":
        return inv / f32(s.factor)
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated. Divisions
    # by a tensor are transformers' reciprocal-then-multiply.
    low_wavelen = f32(s.original_max_position_embeddings / s.low_freq_factor)
    high_wavelen = f32(s.original_max_position_embeddings / s.high_freq_factor)
    wavelen = (f32(1.0) / inv) * f32(2 * math.pi)
    smooth = ((f32(1.0) / wavelen) * f32(s.original_max_position_embeddings) - f32(s.low_freq_factor)) / f32(
        s.high_freq_factor - s.low_freq_factor)
    interpolated = (f32(1.0) - smooth) * inv / f32(s.factor) + smooth * inv
    scaled = np.where(wavelen > low_wavelen, inv / f32(s.factor), inv)
    in_band = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return np.where(in_band, interpolated, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate-half RoPE (the HF convention). x [batch, seq, heads, head_dim], positions [batch, seq]."""
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]  # [b, s, dh/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def attention_inputs(p: Params, x: jax.Array, positions, c: ModelConfig, inv_freq):
    """Pre-norm, q/k/v projections and RoPE: q [batch, seq, heads, head_dim], k and v [batch, seq, kv_heads, head_dim]."""
    h = rms_norm(x, p["attn_norm"], c.rms_norm_eps)
    q = project("bsd,dhk->bshk", h, p["q_proj"])
    k = project("bsd,dhk->bshk", h, p["k_proj"])
    v = project("bsd,dhk->bshk", h, p["v_proj"])
    if c.qkv_bias:
        q, k, v = (y + p[f"{name}_bias"].astype(y.dtype) for y, name in ((q, "q"), (k, "k"), (v, "v")))
    q = constrain(apply_rope(q, positions, inv_freq), "batch", "seq", "act_heads", None)
    k = constrain(apply_rope(k, positions, inv_freq), "batch", "seq", "act_kv_heads", None)
    v = constrain(v, "batch", "seq", "act_kv_heads", None)
    return q, k, v


def attention_output_and_mlp(p: Params, x: jax.Array, attn: jax.Array, c: ModelConfig) -> jax.Array:
    """The rest of the block after attention: output projection, residual, pre-norm SwiGLU MLP, residual."""
    x = x + project("bshk,hkd->bsd", attn, p["o_proj"])
    x = constrain(x, "batch", "seq", "act_embed")
    h = rms_norm(x, p["mlp_norm"], c.rms_norm_eps)
    gate = project("bsd,df->bsf", h, p["gate_proj"])
    up = project("bsd,df->bsf", h, p["up_proj"])
    mlp = constrain(jax.nn.silu(gate) * up, "batch", "seq", "act_mlp")
    x = x + project("bsf,fd->bsd", mlp, p["down_proj"])
    return constrain(x, "batch", "seq", "act_embed")


class SharedKV(NamedTuple):
    """Where each key/value slot of a row comes from, for rows whose sequences share a prefix.

    A pair's two sequences repeat their prompt; a row can hold it once (the tokens of sequence A, then only
    the tokens of B past the shared prefix) while attention still sees both whole sequences: key/value slot j
    is the key/value computed at token `index[b, j]` of the row, with its own segment id and position. Every
    token then runs through the projections and MLP once, and A's and B's queries see the same keys as in
    the unshared row. All three are [batch, kv_len] int32; slots with segment 0 are padding.
    """

    index: jax.Array
    segment_ids: jax.Array
    positions: jax.Array


def decoder_layer(p: Params, x: jax.Array, positions, segment_ids, c: ModelConfig, inv_freq,
                  kv: SharedKV | None = None) -> jax.Array:
    """One pre-norm block. p: this layer's parameters (no 'layers' axis); x [batch, seq, hidden]."""
    q, k, v = attention_inputs(p, x, positions, c, inv_freq)
    kv_segment_ids, kv_positions = segment_ids, positions
    if kv is not None:
        k, v = (jnp.take_along_axis(y, kv.index[:, :, None, None], axis=1) for y in (k, v))
        kv_segment_ids, kv_positions = kv.segment_ids, kv.positions
    attention = with_sequence_parallelism(get_attention(c.attention_impl))
    attn = attention(q, k, v, segment_ids, kv_segment_ids, positions, kv_positions)
    return attention_output_and_mlp(p, x, attn, c)


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def decoder_stack(layers: Params, x: jax.Array, positions, segment_ids, c: ModelConfig,
                  kv: SharedKV | None = None) -> jax.Array:
    """All layers: a scan over groups of `remat_group_size` layers, each group rematerialised as one unit;
    unrolled when `scan_layers` is off (no per-layer slicing of the stacked weights and their gradients,
    which costs ~10% of a small model's step on CPU, for a compile time that grows with depth)."""
    inv_freq = rope_inverse_frequencies(c)
    k = c.remat_group_size
    grouped = jax.tree.map(lambda a: a.reshape(c.num_layers // k, k, *a.shape[1:]), layers)

    def group(x, group_params):
        def layer(x, p):
            return decoder_layer(p, x, positions, segment_ids, c, inv_freq, kv), None

        return jax.lax.scan(layer, x, group_params)[0]

    if c.remat_policy != "none":
        group = jax.checkpoint(group, policy=_REMAT_POLICIES[c.remat_policy])
    unroll = 1 if c.scan_layers else c.num_layers // k
    return jax.lax.scan(lambda x, p: (group(x, p), None), x, grouped, unroll=unroll)[0]


class KVCache(NamedTuple):
    """Keys and values of every layer for `max_len` slots, plus what the attention mask needs per slot.

    k: one [batch, kv_heads, max_len, head_dim] array per layer, v: one [batch, kv_heads, head_dim, max_len]
    per layer (compute dtype): the layouts the two attention matmuls read without transposing, and separate
    arrays because a layer's slice of a stacked cache is a copy on XLA:CPU. segment_ids, positions
    [batch, max_len] int32; segment 0 marks an empty or padding slot, which no query attends to.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    segment_ids: jax.Array
    positions: jax.Array


def init_cache(c: ModelConfig, batch: int, max_len: int) -> KVCache:
    """An empty cache: every slot has segment 0."""
    dtype = jnp.dtype(c.dtype)
    k = tuple(jnp.zeros((batch, c.num_kv_heads, max_len, c.head_dim), dtype) for _ in range(c.num_layers))
    v = tuple(jnp.zeros((batch, c.num_kv_heads, c.head_dim, max_len), dtype) for _ in range(c.num_layers))
    slots = jnp.zeros((batch, max_len), jnp.int32)
    return KVCache(k, v, slots, slots)


def repeat_cache_rows(cache: KVCache, times: int) -> KVCache:
    """Each batch row of the cache `times` times in a row (a prompt's cache for each of its samples)."""
    if times == 1:
        return cache
    repeat = lambda a: jnp.repeat(a, times, axis=0)
    return KVCache(tuple(map(repeat, cache.k)), tuple(map(repeat, cache.v)), repeat(cache.segment_ids),
                   repeat(cache.positions))


def _write_slots(cache: jax.Array, new: jax.Array, start: tuple) -> jax.Array:
    """`dynamic_update_slice(cache, new, start)` in place. A 16-bit float cache is updated as raw 16-bit words:
    XLA:CPU computes a bf16 update in float32, which converts and rewrites the whole cache at every step."""
    new = new.astype(cache.dtype)
    if cache.dtype.itemsize != 2 or not jnp.issubdtype(cache.dtype, jnp.floating):
        return jax.lax.dynamic_update_slice(cache, new, start)
    words = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16)
    return jax.lax.bitcast_convert_type(jax.lax.dynamic_update_slice(words(cache), words(new), start), cache.dtype)


def split_layers(layers: Params, num_layers: int) -> tuple[Params, ...]:
    """The stacked layer parameters as one dict per layer (static slices: XLA copies each once)."""
    return tuple(jax.tree.map(lambda a: a[i], layers) for i in range(num_layers))


def cached_decoder_stack(layers: tuple[Params, ...], x: jax.Array, positions, segment_ids, cache: KVCache,
                         index, c: ModelConfig) -> tuple[jax.Array, KVCache]:
    """All layers over new tokens x [batch, seq, hidden] written into cache slots [index, index + seq).

    The new queries attend to every cache slot of their segment at positions <= their own, so one function
    serves both the prompt prefill (seq = prompt length) and each decode step (seq = 1). Cache arrays are
    updated with `dynamic_update_slice`, which XLA performs in place.

    layers: `split_layers` of the stacked parameters; the layers are unrolled, not scanned. A decode loop
    splits them once outside the loop: slicing a layer out of the stack inside it makes XLA:CPU copy that
    layer's weights on every step (a third of a bench-small decode step).
    """
    inv_freq = rope_inverse_frequencies(c)
    kv_segment_ids = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32), (0, index))
    kv_positions = jax.lax.dynamic_update_slice(cache.positions, positions.astype(jnp.int32), (0, index))
    attention = get_attention(c.attention_impl)
    keys, values = [], []
    for p, k_all, v_all in zip(layers, cache.k, cache.v, strict=True):
        q, k, v = attention_inputs(p, x, positions, c, inv_freq)
        k_all = _write_slots(k_all, k.transpose(0, 2, 1, 3), (0, 0, index, 0))
        v_all = _write_slots(v_all, v.transpose(0, 2, 3, 1), (0, 0, 0, index))
        attn = attention(q, k_all.transpose(0, 2, 1, 3), v_all.transpose(0, 3, 1, 2), segment_ids,
                         kv_segment_ids, positions, kv_positions)
        x = attention_output_and_mlp(p, x, attn, c)
        keys.append(k_all)
        values.append(v_all)
    return x, KVCache(tuple(keys), tuple(values), kv_segment_ids, kv_positions)


def _declare(module: nn.Module, name, shape, axes, initializer, dtype) -> jax.Array:
    return module.param(name, nn.with_logical_partitioning(initializer, axes), shape, jnp.dtype(dtype))


class StackedLayers(nn.Module):
    """Declares the parameters of all layers, each with a leading [num_layers] axis; returns them as a dict."""

    config: ModelConfig

    @nn.compact
    def __call__(self) -> dict[str, jax.Array]:
        c = self.config
        init = nn.initializers.normal(c.initializer_range)

        def declare(name, shape, axes):
            if not self.is_initializing() and self.has_variable("params", name):
                # As given: a kernel may be a LoRA or quantised one (models/lora.py), which `param` cannot check.
                return nn.meta.unbox(self.get_variable("params", name))
            return _declare(self, name, (c.num_layers, *shape), ("layers", *axes),
                            nn.initializers.ones if name.endswith("norm") else init, c.param_dtype)

        return {name: declare(name, shape, axes) for name, (shape, axes) in _layer_param_specs(c).items()}


class Transformer(nn.Module):
    """Decoder-only LM. `__call__` gives final-normed hidden states; `logits` and `values` are the heads."""

    config: ModelConfig

    def setup(self):
        c = self.config
        init = nn.initializers.normal(c.initializer_range)
        ones = nn.initializers.ones

        def param(name, shape, axes, initializer):
            return _declare(self, name, shape, axes, initializer, c.param_dtype)

        self.embed = param("embed", (c.vocab_size, c.hidden_size), ("vocab", "embed"), init)
        self.layers = StackedLayers(c, name="layers")
        self.final_norm = param("final_norm", (c.hidden_size,), ("norm",), ones)
        if not c.tie_embeddings:
            self.lm_head = param("lm_head", (c.hidden_size, c.vocab_size), ("embed", "vocab"), init)
        if c.value_head:
            self.value_kernel = param("value_kernel", (c.hidden_size,), ("embed",), init)
            self.value_bias = param("value_bias", (), (), nn.initializers.zeros)

    def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 kv: SharedKV | None = None) -> jax.Array:
        """tokens, positions, segment_ids [batch, seq] int -> hidden [batch, seq, hidden] (compute dtype).

        kv: for rows that hold a shared prefix once (see `SharedKV`); None attends within the row as laid out.
        """
        c = self.config
        x = jnp.take(self.embed, tokens, axis=0).astype(jnp.dtype(c.dtype))
        x = constrain(x, "batch", "seq", "act_embed")
        x = decoder_stack(self.layers(), x, positions, segment_ids, c, kv)
        return rms_norm(x, self.final_norm, c.rms_norm_eps)

    def decode(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, cache: KVCache,
               index: jax.Array, layers: tuple[Params, ...] | None = None) -> tuple[jax.Array, KVCache]:
        """Inference with a KV cache: tokens, positions, segment_ids [batch, seq] go into slots [index, index + seq).

        Returns (final-normed hidden [batch, seq, hidden], updated cache). Same parameters as `__call__`;
        layers: `split_layers` of them, made once outside a decode loop (see `cached_decoder_stack`); by
        default they are split here.
        """
        c = self.config
        x = jnp.take(self.embed, tokens, axis=0).astype(jnp.dtype(c.dtype))
        x = constrain(x, "batch", "seq", "act_embed")
        layers = split_layers(self.layers(), c.num_layers) if layers is None else layers
        x, cache = cached_decoder_stack(layers, x, positions, segment_ids, cache, index, c)
        return rms_norm(x, self.final_norm, c.rms_norm_eps), cache

    def unembedding(self) -> jax.Array:
        """[hidden, vocab] output-head matrix (the transposed embedding when tied)."""
        return self.embed.T if self.config.tie_embeddings else self.lm_head

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [batch, seq, hidden] -> logits [batch, seq, vocab] in float32."""
        logits = jnp.einsum("bsd,dv->bsv", hidden, self.unembedding().astype(hidden.dtype),
                            preferred_element_type=jnp.float32)
        return constrain(logits, "batch", "seq", "act_vocab")

    def values(self, hidden: jax.Array) -> jax.Array:
        """hidden [batch, seq, hidden] -> scalar values [batch, seq] in float32."""
        if not self.config.value_head:
            raise ValueError("this model has no value head; set model.value_head=True")
        v = jnp.einsum("bsd,d->bs", hidden.astype(jnp.float32), self.value_kernel.astype(jnp.float32))
        return v + self.value_bias.astype(jnp.float32)


def dummy_inputs(batch: int = 1, seq: int = 8) -> tuple[jax.Array, jax.Array, jax.Array]:
    tokens = jnp.zeros((batch, seq), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    return tokens, positions, jnp.ones((batch, seq), jnp.int32)
