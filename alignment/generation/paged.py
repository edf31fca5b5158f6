"""The device side of the rollout engine: the paged KV cache and the two programs that run the model over it.

Cache: per layer, K and V pages [kv_heads, pages, page_size, head_dim] in the compute dtype. Under a mesh the
pages axis is split over the data axes (each data shard holds its own pages, numbered from 0 inside the shard,
and its rows use only those) and kv heads over `tensor`; everything touching pages runs per shard (shard_map),
the model's matmuls as the training rules shard them.

Programs (jit them with the keyword arguments static; shapes are buckets, so each compiles once per bucket):
  * `prefill_program`: rows of up to T new tokens each (a prompt chunk; positions -1 pad a short row) are
    written into their pages and attend to everything before them there (`kernels/paged_attention`); a row whose
    chunk ends its known tokens also draws its next token from the logits of its last one.
  * `decode_program`: up to `steps` decode steps of every active row, a `lax.while_loop` that can stop early
    when a row finishes, so the host can give its slot to a waiting request at the next step.
Decoding attends in one of two ways. With a Pallas kernel (TPU, GPU) each step writes its keys and values into
the pages and the kernel reads every row's own pages. With the gather-based xla implementation (CPU) the rows'
pages are gathered once per call into dense per-row copies that the steps append to and attend over, and the
new tokens go back to the pages after the loop: gathering at every step would copy each row's whole cache per
token (XLA:CPU gathers ~10x slower than its attention reads them). On CPUs with AVX512-BF16 and bf16 compute the
engine also packs its copy of the weights (`prepare_weights(pack=True)`) and decodes with the C++ kernels of
`kernels/cpu_decode` (a small-batch matmul and the attention over the dense copies): XLA:CPU's bf16 matmuls of
a few rows read weights at under half the memory's rate.

Tokens are drawn as `sampling.sample` draws them, with the key fold_in(fold_in(key(seed), sample), t) for the
t-th generated token of a sequence, so a token depends only on its sequence, never on the batch it ran in or
the step it joined at. Log-probs are those of the full softmax(logits / temperature), what the trainer scores.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from alignment import sharding
from alignment.generation import sampling as sampling_lib
from alignment.models import ModelConfig, Transformer, lora, packed
from alignment.models.transformer import (attention_inputs, attention_output_and_mlp, rms_norm,
                                          rope_inverse_frequencies, split_layers)
from alignment_kernels.cpu_decode import api as cpu_decode
from alignment_kernels.paged_attention import api as paged_api
from alignment_kernels.paged_attention import xla as paged_xla
from alignment_kernels.paged_attention.reference import gather_rows

Pool = dict  # {"k": per-layer pages, "v": per-layer pages}


def gathers_views(impl: str) -> bool:
    """Whether decoding with the paged-attention implementation named `impl` attends to dense copies (the
    gather-based ones) rather than reading the pages at every step (the Pallas kernels)."""
    return impl not in paged_api.NEEDS_SHARD_MAP


class Layout:
    """How pages, rows and heads lie on the mesh: the per-shard wrapper of every function touching pages."""

    def __init__(self, mesh: Mesh, rules: Mapping[str, Any]):
        self.mesh = mesh
        self.rows = sharding.logical_to_spec(("batch",), rules)[0]
        self.kv_heads = sharding.logical_to_spec(("act_kv_heads",), rules)[0]
        self.heads = sharding.logical_to_spec(("act_heads",), rules)[0]
        self.pages = PartitionSpec(self.kv_heads, self.rows, None, None)

    def spec(self, kind: str, ndim: int) -> PartitionSpec:
        """rows: [rows, ...]; queries: [rows, T, heads, head_dim]; new: [rows, T, kv_heads, head_dim];
        pages; views: [rows, kv_heads, ...]."""
        if kind == "pages":
            return self.pages
        second = {"queries": (None, self.heads), "new": (None, self.kv_heads), "views": (self.kv_heads,)}
        lead = (self.rows, *second.get(kind, ()))
        return PartitionSpec(*lead, *[None] * (ndim - len(lead)))

    def per_shard(self, fn: Callable, inputs: tuple[str, ...], outputs: tuple[str, ...] | str) -> Callable:
        """fn run on each shard's rows and pages; `inputs` / `outputs` name each argument's kind (see `spec`)."""
        def run(*args):
            in_specs = tuple(self.spec(kind, a.ndim) for kind, a in zip(inputs, args))
            shapes = jax.eval_shape(fn, *args)
            kinds = (outputs,) if isinstance(outputs, str) else outputs
            flat = (shapes,) if isinstance(outputs, str) else shapes
            out_specs = tuple(self.spec(kind, s.ndim) for kind, s in zip(kinds, flat))
            out_specs = out_specs[0] if isinstance(outputs, str) else out_specs
            return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)

        return run


def pool_dtype(config: ModelConfig, views: bool) -> jnp.dtype:
    """The cache's dtype: the compute dtype, except float32 for a 16-bit one on the dense-copies path (CPU): XLA:CPU
    computes a bf16 scatter in float32, converting and rewriting the whole cache at every write, and bf16 values
    are exact in float32."""
    dtype = jnp.dtype(config.dtype)
    return jnp.dtype(jnp.float32) if views and dtype.itemsize == 2 else dtype


def init_pool(config: ModelConfig, pages: int, page_size: int, layout: Layout, dtype) -> Pool:
    """An empty cache of `pages` pages in all (every data shard's together)."""
    shape = (config.num_kv_heads, pages, page_size, config.head_dim)
    placed = jax.sharding.NamedSharding(layout.mesh, layout.pages)
    zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=placed)
    return {"k": tuple(zeros() for _ in range(config.num_layers)), "v": tuple(zeros() for _ in range(config.num_layers))}


def _words(x: jax.Array) -> jax.Array:
    """A 16-bit float array as its raw uint16 words (anything else as it is): XLA:CPU computes bfloat16 gathers,
    scatters and dynamic_update_slices in float32, converting the whole array to do so; on words it moves only
    the values concerned."""
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if _is_half(x.dtype) else x


def _from_words(x: jax.Array, dtype) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, dtype) if x.dtype == jnp.uint16 and _is_half(jnp.dtype(dtype)) else x


def _is_half(dtype) -> bool:
    return dtype.itemsize == 2 and jnp.issubdtype(dtype, jnp.floating)


def write_tokens(pages: jax.Array, new: jax.Array, page_table: jax.Array, positions: jax.Array) -> jax.Array:
    """pages with new [rows, T, kv_heads, head_dim] written at the rows' positions [rows, T] (through the page
    table [rows, P]); tokens at a negative position go to the scratch page."""
    page_size = pages.shape[2]
    real = positions >= 0
    page = jnp.where(real, jnp.take_along_axis(page_table, jnp.maximum(positions, 0) // page_size, axis=1), 0)
    offset = jnp.where(real, positions % page_size, 0)
    return pages.at[:, page, offset].set(new.transpose(2, 0, 1, 3).astype(pages.dtype))


class Weights(NamedTuple):
    """The model's weights as the programs use them: matrices in the compute dtype and the stacked layers split
    into one dict per layer (slicing a layer out of the stack inside a loop makes XLA:CPU copy its weights at
    every step). An untied 16-bit embedding is kept as its `_words` (only gathered from; converting it inside
    a program copies the whole table at each call)."""

    params: Any  # every weight outside the layers (embedding, final norm, head)
    layers: tuple  # one dict of weights per layer


def prepare_weights(params: Any, config: ModelConfig, pack: bool = False) -> Weights:
    """Casting once instead of at every matmul gives the same numbers (the model casts to that dtype anyway).
    LoRA adapters bound to their base (`lora.bind`) are folded into it here: the copy is made anyway, and a
    merged kernel decodes with one matmul per projection instead of three. pack: lay the projections and the
    head out for the CPU decode matmul (`packed.Packed`; bfloat16 compute, where `cpu_decode.available()`)."""
    params = lora.fold(params)
    matrices = lambda tree: jax.tree.map(lambda a: a.astype(config.dtype) if a.ndim >= 2 else a, tree)
    layers = matrices(split_layers(params["layers"], config.num_layers))
    # Without the stacked layers: the programs read the split ones, and a stacked copy would double the weights.
    params = matrices({k: v for k, v in params.items() if k != "layers"})
    if not config.tie_embeddings:
        params["embed"] = _words(params["embed"])
    if pack:
        params, layers = packed.pack_for_decode(params, layers, lora.PROJECTIONS)
    return Weights(params, layers)


def _weights(weights: Weights | Any, config: ModelConfig) -> Weights:
    """A program's weights: prepared by the caller (once per set of weights), or here (once per call)."""
    return weights if isinstance(weights, Weights) else prepare_weights(weights, config)


def _embed_rows(table: jax.Array, tokens: jax.Array, dtype) -> jax.Array:
    """table [vocab, hidden] rows (in dtype, or its `_words`) at tokens [...], in dtype."""
    return _from_words(jnp.take(table, tokens, axis=0), dtype).astype(dtype)


def _forward(model: Transformer, params, layers, tokens, positions, attend) -> jax.Array:
    """Final-normed hidden [rows, T, hidden] of tokens [rows, T] at positions [rows, T]; attend(layer, q, k, v)
    gives each layer's attention output (and records the layer's keys and values)."""
    c = model.config
    x = sharding.constrain(_embed_rows(params["embed"], tokens, c.dtype), "batch", "seq", "act_embed")
    inv_freq = rope_inverse_frequencies(c)
    for i, p in enumerate(layers):
        q, k, v = attention_inputs(p, x, jnp.maximum(positions, 0), c, inv_freq)
        x = attention_output_and_mlp(p, x, attend(i, q, k, v), c)
    return rms_norm(x, params["final_norm"], c.rms_norm_eps)


def _keys(seeds: jax.Array, samples: jax.Array) -> jax.Array:
    return jax.vmap(lambda s, g: jax.random.fold_in(jax.random.key(s), g))(seeds, samples)


def _draw(model, params, hidden, keys, index, settings) -> dict[str, jax.Array]:
    """One token per row from hidden [rows, hidden]: the index-th draw of each row's key."""
    if isinstance(params.get("lm_head"), packed.Packed):  # `prepare_weights(pack=True)`
        logits = params["lm_head"].apply(hidden)
    else:
        logits = model.apply({"params": params}, hidden[:, None], method=Transformer.logits)[:, 0]
    return sampling_lib.sample(jax.vmap(jax.random.fold_in)(keys, index), logits, settings)


def prefill_program(model: Transformer, weights, pool: Pool, tokens, positions, page_table, kv_lens, last,
                    seeds, samples, drawn, settings, *, attention: Callable, layout: Layout) -> tuple[Pool, dict]:
    """Writes tokens [rows, T] (at positions [rows, T], -1 = padding) into the pages of page_table [rows, P] and
    draws each row's next token from the hidden state at index last [rows] (the host keeps it only for rows
    whose chunk ends their known tokens). kv_lens [rows]: each row's tokens in the cache after this chunk;
    drawn [rows]: tokens the row has generated so far (the index of this draw); settings: `sampling.stack_params`.
    weights: the model's parameters or their `prepare_weights`; attention: a `kernels/paged_attention`
    implementation. Returns the pool and {"tokens", "logprobs", "sampling_logprobs"} [rows]."""
    params, layers = _weights(weights, model.config)
    attention = layout.per_shard(attention, ("queries", "pages", "pages", "rows", "rows", "rows"), "queries")
    write = layout.per_shard(write_tokens, ("pages", "new", "rows", "rows"), "pages")
    k_pages, v_pages = list(pool["k"]), list(pool["v"])

    def attend(i, q, k, v):
        k_pages[i] = write(k_pages[i], k, page_table, positions)
        v_pages[i] = write(v_pages[i], v, page_table, positions)
        return attention(q, k_pages[i], v_pages[i], page_table, kv_lens, positions)

    hidden = _forward(model, params, layers, tokens, positions, attend)
    hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    drawn = _draw(model, params, hidden, _keys(seeds, samples), drawn, settings)
    return {"k": tuple(k_pages), "v": tuple(v_pages)}, drawn


def _gather_view(pages, page_table, *, dtype, minor: bool):
    """A dense per-row copy of the rows' pages in `dtype`, as `_words`: [rows, kv_heads, L, head_dim], or with
    `minor` [rows, kv_heads, head_dim, L] (L = P * page_size). The decode loop keeps the copies as words, so
    appending a token writes only it and attention converts as it reads."""
    view = gather_rows(pages, page_table).transpose(0, 2, 1, 3)
    return _words((view.swapaxes(2, 3) if minor else view).astype(dtype))


def _put_token(view: jax.Array, new: jax.Array, at: jax.Array, *, dtype, minor: bool) -> jax.Array:
    """A `_gather_view` view with each row's new [rows, 1, kv_heads, head_dim] at position at[row]."""
    new = _words((new.transpose(0, 2, 3, 1) if minor else new.transpose(0, 2, 1, 3)).astype(dtype))
    put = lambda row, value, index: jax.lax.dynamic_update_slice_in_dim(row, value, index, 2 if minor else 1)
    return jax.vmap(put)(view, new, at)


def decode_program(model: Transformer, weights, pool: Pool, tokens, kv_lens, page_table, active, seeds, samples,
                   drawn, max_new, stop_ids, settings, until, exit_after, *, steps: int, pad_id: int,
                   attention: Callable, views: bool, layout: Layout, cpu_kernels: bool = False) -> tuple[Pool, dict]:
    """Up to `until` (<= steps) decode steps of rows [rows] (see the module docstring).

    tokens: each row's last drawn token, not yet in the cache, at position kv_lens; page_table [rows, P] covers
    positions < kv_lens + until, past a row's own pages with the scratch page (a finished row goes on writing
    at its next positions until the loop ends); active: rows with a sequence; drawn: tokens each row has generated (its last one
    included); max_new: each row's limit on them; stop_ids [rows, S] (-1 = unused). Stops early once
    `exit_after` rows have finished in this call (the host has sequences waiting for their slots), and once every
    row is done. attention: a
    `kernels/paged_attention` implementation, used at every step unless `views` (see the module docstring);
    cpu_kernels: with `views`, bf16 compute and weights from `prepare_weights(pack=True)`, attend with
    `cpu_decode.attention` (the projections take `cpu_decode.matmul` through the packed weights).

    Returns the pool and {"tokens", "logprobs", "sampling_logprobs"} [rows, steps] (step i's token in column i,
    pad_id / 0 where a row was done), "counts" [rows] (tokens each row drew) and "stopped" [rows] (ended with a
    stop token).
    """
    params, layers = _weights(weights, model.config)
    dtype = jnp.dtype(model.config.dtype)
    keys = _keys(seeds, samples)
    rows = tokens.shape[0]
    state = dict(
        i=jnp.int32(0), last=tokens, done=~active, ended=jnp.int32(0),
        counts=jnp.zeros((rows,), jnp.int32), stopped=jnp.zeros((rows,), bool),
        tokens=jnp.full((rows, steps), pad_id, jnp.int32), logprobs=jnp.zeros((rows, steps), jnp.float32),
        sampling_logprobs=jnp.zeros((rows, steps), jnp.float32))
    # Which view has positions as its minor axis: XLA's matmuls read V that way, the CPU kernel reads K that way.
    k_minor, v_minor = (True, False) if cpu_kernels else (False, True)
    if views:
        gather = lambda minor: layout.per_shard(functools.partial(_gather_view, dtype=dtype, minor=minor),
                                                ("pages", "rows"), "views")
        state["cache"] = (tuple(gather(k_minor)(k, page_table) for k in pool["k"]),
                          tuple(gather(v_minor)(v, page_table) for v in pool["v"]))
    else:
        state["cache"] = (pool["k"], pool["v"])
        attention = layout.per_shard(attention, ("queries", "pages", "pages", "rows", "rows", "rows"), "queries")
        write = layout.per_shard(write_tokens, ("pages", "new", "rows", "rows"), "pages")

    def keep_going(state):
        return (state["i"] < jnp.minimum(until, steps)) & ~jnp.all(state["done"]) & (state["ended"] < exit_after)

    def step(state):
        i, live = state["i"], ~state["done"]
        positions = kv_lens + i
        k_cache, v_cache = list(state["cache"][0]), list(state["cache"][1])

        def attend(layer, q, k, v):
            if views:
                k_cache[layer] = _put_token(k_cache[layer], k, positions, dtype=dtype, minor=k_minor)
                v_cache[layer] = _put_token(v_cache[layer], v, positions, dtype=dtype, minor=v_minor)
                if cpu_kernels:
                    return cpu_decode.attention(q[:, 0], k_cache[layer], v_cache[layer], positions + 1)[:, None]
                return paged_xla.dense_attention(q, _from_words(k_cache[layer], dtype).transpose(0, 2, 1, 3),
                                                 _from_words(v_cache[layer], dtype).transpose(0, 3, 1, 2),
                                                 positions + 1, positions[:, None])
            where = jnp.where(live, positions, -1)[:, None]  # finished rows write to the scratch page
            k_cache[layer] = write(k_cache[layer], k, page_table, where)
            v_cache[layer] = write(v_cache[layer], v, page_table, where)
            return attention(q, k_cache[layer], v_cache[layer], page_table, positions + 1, where)

        hidden = _forward(model, params, layers, state["last"][:, None], positions[:, None], attend)[:, 0]
        out = _draw(model, params, hidden, keys, drawn + i, settings)
        stop = live & jnp.any(out["tokens"][:, None] == stop_ids, axis=-1)
        counts = state["counts"] + live
        put = lambda buf, value, fill: jax.lax.dynamic_update_slice_in_dim(
            buf, jnp.where(live, value, fill)[:, None].astype(buf.dtype), i, axis=1)
        ended = stop | (live & (drawn + counts >= max_new))
        return dict(
            state, i=i + 1, last=out["tokens"], done=state["done"] | ended, ended=state["ended"] + jnp.sum(ended),
            counts=counts, stopped=state["stopped"] | stop, cache=(tuple(k_cache), tuple(v_cache)),
            tokens=put(state["tokens"], out["tokens"], pad_id), logprobs=put(state["logprobs"], out["logprobs"], 0.0),
            sampling_logprobs=put(state["sampling_logprobs"], out["sampling_logprobs"], 0.0))

    state = jax.lax.while_loop(keep_going, step, state)
    k_cache, v_cache = state.pop("cache")
    if views:  # the tokens this call wrote into the dense copies go back to the pages
        written = kv_lens[:, None] + jnp.arange(steps, dtype=jnp.int32)
        written = jnp.where(jnp.arange(steps) < state["counts"][:, None], written, -1)
        write = layout.per_shard(_write_views_back, ("pages", "views", "rows", "rows"), "pages")
        back = lambda pages, view, minor: write(pages, _from_words(view.swapaxes(2, 3) if minor else view, dtype),
                                                page_table, written)
        k_cache = tuple(back(p, view, k_minor) for p, view in zip(pool["k"], k_cache))
        v_cache = tuple(back(p, view, v_minor) for p, view in zip(pool["v"], v_cache))
    outputs = {k: state[k] for k in ("tokens", "logprobs", "sampling_logprobs", "counts", "stopped")}
    return {"k": k_cache, "v": v_cache}, outputs


def _write_views_back(pages, view, page_table, positions):
    """pages with the view's [rows, kv_heads, L, head_dim] tokens at positions [rows, n] (-1 = none) copied in."""
    taken = jnp.take_along_axis(view, jnp.maximum(positions, 0)[:, None, :, None], axis=2)  # [rows, kvh, n, hd]
    return write_tokens(pages, taken.transpose(0, 2, 1, 3), page_table, positions)
