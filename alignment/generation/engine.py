"""The rollout engine: batched prefill + KV-cache decoding, two jitted programs per shape bucket.

Layout of one call (B prompts, G samples each, R = B * G rows):
  * prompts are left-padded to a bucket length P; padding slots get segment 0 and are never attended to;
  * the prompt is prefilled once per prompt into a cache of P + N slots (N = new-token bucket); for group
    sampling the filled cache is then repeated G times, so each prompt is computed once for its G samples;
  * decoding is one `lax.while_loop`: step t writes every row's token into cache slot P + t - 1 (one slot for
    all rows; each row's RoPE position is its own prompt length + t - 1) and stops when every row is done. A
    caller that may cancel (a server) runs it in chunks of steps, the same program, asking between chunks.
The program runs on the training mesh (rows over the data axes, heads over `tensor`), so trainer parameters
are used where they lie. Shapes are rounded up to buckets (powers of two) and jit compiles once per bucket.

Log-probs: `logprobs` are log softmax(logits / temperature) of each sampled token (temperature 1 for greedy
rows), exactly what `algorithms.logprobs.token_logprobs(..., temperature)` recomputes in the trainer. When
top-k / top-p / min-p truncation is on, tokens are drawn from the truncated distribution instead:
`Completions.truncated` says so and `sampling_logprobs` holds the log-probs under that truncated distribution,
so a trainer can correct for the mismatch (or keep truncation off for on-policy RL).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alignment import sharding
from alignment.generation import sampling as sampling_lib
from alignment.generation.sampling import SamplingParams
from alignment.models import ModelConfig, Transformer
from alignment.models.transformer import KVCache, init_cache, repeat_cache_rows, split_layers

MIN_BUCKET = 16
_STOP_SLOTS = 8  # stop ids are padded to a multiple of this, so adding one rarely recompiles


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """The static size used for n: the next power of two, at least `minimum`."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


class Cancelled(Exception):
    """`Engine.generate` stopped because its `cancelled` callback said so, after `steps` of the decode steps."""

    def __init__(self, steps: int):
        super().__init__(f"generation cancelled after {steps} decode steps")
        self.steps = steps


@dataclasses.dataclass(frozen=True)
class Completions:
    """Generated tokens of R = prompts * num_samples rows; row i * num_samples + g is sample g of prompt i.

    tokens [R, max_new] int32 (pad_id after each row's length); lengths [R] count the tokens generated,
    including a final stop token; logprobs and sampling_logprobs [R, max_new] float32 (0 after the length, see
    the module docstring); stopped [R] bool: the row ended with a stop token rather than its token limit.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    logprobs: np.ndarray
    sampling_logprobs: np.ndarray
    stopped: np.ndarray
    truncated: bool  # some row sampled from a top-k / top-p / min-p truncated distribution
    num_samples: int

    def row(self, i: int) -> list[int]:
        """The generated token ids of row i, without padding."""
        return self.tokens[i, : self.lengths[i]].tolist()


def _constrain_cache(cache: KVCache) -> KVCache:
    constrain = lambda a: sharding.constrain(a, "batch", "act_kv_heads", None, None)
    return KVCache(tuple(map(constrain, cache.k)), tuple(map(constrain, cache.v)),
                   sharding.constrain(cache.segment_ids, "batch", None),
                   sharding.constrain(cache.positions, "batch", None))


def _in_compute_dtype(params: Any, config: ModelConfig) -> tuple[Any, Any]:
    """(params, per-layer weights) with every weight matrix in the compute dtype.

    Cast once per program instead of once per matmul at every decode step; the model casts them to that dtype
    anyway, so the numbers are the same.
    """
    matrices = lambda tree: jax.tree.map(lambda a: a.astype(config.dtype) if a.ndim >= 2 else a, tree)
    layers = matrices(split_layers(params["layers"], config.num_layers))
    return dict(params, **matrices({k: v for k, v in params.items() if k != "layers"})), layers


def _record(state: dict, logits: jax.Array, stop_ids: jax.Array, settings: Mapping[str, jax.Array],
            pad_id: int) -> dict:
    """The state after step state["t"]: every unfinished row draws its token from logits [R, V]."""
    t = state["t"]
    drawn = sampling_lib.sample(jax.vmap(jax.random.fold_in, (0, None))(state["keys"], t), logits, settings)
    active = ~state["done"]
    stop = active & jnp.any(drawn["tokens"][:, None] == stop_ids[None, :], axis=-1)
    put = lambda buf, value, fill: jax.lax.dynamic_update_slice(
        buf, jnp.where(active, value, fill)[:, None].astype(buf.dtype), (0, t))
    lengths = state["lengths"] + active
    return dict(
        state, t=t + 1,
        tokens=put(state["tokens"], drawn["tokens"], pad_id),
        logprobs=put(state["logprobs"], drawn["logprobs"], 0.0),
        sampling_logprobs=put(state["sampling_logprobs"], drawn["sampling_logprobs"], 0.0),
        last=drawn["tokens"], lengths=lengths, stopped=state["stopped"] | stop,
        done=state["done"] | stop | (lengths >= state["max_new"]),
    )


def prefill_program(model: Transformer, params: Any, prompts: jax.Array, prompt_lengths: jax.Array,
                    seeds: jax.Array, max_new: jax.Array, stop_ids: jax.Array, settings: Mapping[str, jax.Array],
                    *, num_samples: int, new_tokens: int, pad_id: int) -> dict[str, jax.Array]:
    """The prompts' cache and every row's first token: the decoding state `decode_program` continues (jit it
    with num_samples, new_tokens, pad_id static).

    prompts [B, P] int32 left-padded; prompt_lengths [B] (0 marks a filler row); seeds [B] int32; max_new [R]
    tokens per row (<= new_tokens); stop_ids [S] (-1 = unused); settings: `sampling.stack_params` arrays [R].
    """
    c = model.config
    batch, prompt_len = prompts.shape
    params, layers = _in_compute_dtype(params, c)
    run = lambda method, *args: model.apply({"params": params}, *args, method=method)

    slots = jnp.arange(prompt_len, dtype=jnp.int32)
    padding = (prompt_len - prompt_lengths)[:, None]
    segment_ids = (slots >= padding).astype(jnp.int32)
    positions = jnp.maximum(slots - padding, 0)
    cache = _constrain_cache(init_cache(c, batch, prompt_len + new_tokens))
    hidden, cache = run(Transformer.decode, prompts, positions, segment_ids, cache, 0, layers)
    logits = run(Transformer.logits, hidden[:, -1:])[:, 0]

    rows = batch * num_samples
    sample_index = jnp.tile(jnp.arange(num_samples), batch)
    state = dict(
        t=jnp.int32(0),
        tokens=jnp.full((rows, new_tokens), pad_id, jnp.int32),
        logprobs=jnp.zeros((rows, new_tokens), jnp.float32),
        sampling_logprobs=jnp.zeros((rows, new_tokens), jnp.float32),
        last=jnp.zeros((rows,), jnp.int32), lengths=jnp.zeros((rows,), jnp.int32),
        stopped=jnp.zeros((rows,), bool), done=max_new <= 0, max_new=max_new,
        next_position=jnp.repeat(prompt_lengths, num_samples),
        keys=jax.vmap(lambda s, g: jax.random.fold_in(jax.random.key(s), g))(
            jnp.repeat(seeds, num_samples), sample_index),
        cache=_constrain_cache(repeat_cache_rows(cache, num_samples)),
    )
    return _record(state, jnp.repeat(logits, num_samples, axis=0), stop_ids, settings, pad_id)


def decode_program(model: Transformer, params: Any, state: dict[str, jax.Array], stop_ids: jax.Array,
                   settings: Mapping[str, jax.Array], until: jax.Array, *, prompt_len: int,
                   pad_id: int) -> dict[str, jax.Array]:
    """Decoding steps of state (from `prefill_program`) until step `until` (a scalar, so a caller can run the
    steps in chunks without recompiling), the new-token bucket, or every row is done (jit it with prompt_len, the
    prompt bucket P, and pad_id static). Step t writes every row's token into cache slot P + t - 1."""
    new_tokens = state["tokens"].shape[1]
    params, layers = _in_compute_dtype(params, model.config)
    run = lambda method, *args: model.apply({"params": params}, *args, method=method)

    def keep_going(state):
        return (state["t"] < jnp.minimum(until, new_tokens)) & ~jnp.all(state["done"])

    def step(state):
        t = state["t"]
        tokens = state["last"][:, None]
        position = (state["next_position"] + t - 1)[:, None]
        hidden, cache = run(Transformer.decode, tokens, position, jnp.ones_like(tokens), state["cache"],
                            prompt_len + t - 1, layers)
        logits = run(Transformer.logits, hidden)[:, 0]
        return _record(dict(state, cache=_constrain_cache(cache)), logits, stop_ids, settings, pad_id)

    return jax.lax.while_loop(keep_going, step, state)


class Engine:
    """Generation from a model whose parameters already lie on `mesh` (e.g. the trainer's own)."""

    def __init__(self, config: ModelConfig, params: Any, mesh: Mesh, rules: Mapping[str, Any], *, pad_id: int,
                 stop_ids: Sequence[int] = (), max_len: int | None = None):
        """stop_ids: tokens that end a row (EOS, end-of-turn); max_len: context limit, default the model's."""
        self.config, self.params, self.mesh, self.rules = config, params, mesh, dict(rules)
        self.model = Transformer(config)
        self.pad_id = int(pad_id)
        self.stop_ids = tuple(int(i) for i in stop_ids)
        self.max_len = int(max_len or config.max_position_embeddings)
        batch_axes = self.rules["batch"]
        axes = () if batch_axes is None else (batch_axes,) if isinstance(batch_axes, str) else batch_axes
        self.data_parallel = math.prod(mesh.shape[a] for a in axes)
        self._rows = NamedSharding(mesh, PartitionSpec(batch_axes))
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._prefill = jax.jit(functools.partial(prefill_program, self.model),
                                static_argnames=("num_samples", "new_tokens", "pad_id"))
        self._decode = jax.jit(functools.partial(decode_program, self.model),
                               static_argnames=("prompt_len", "pad_id"), donate_argnames=("state",))

    def check_lengths(self, prompt_length: int, max_new_tokens: int) -> None:
        """ValueError when a prompt plus its new tokens exceed the context limit (requests are refused, not cut)."""
        if prompt_length < 1:
            raise ValueError("prompt is empty")
        if prompt_length + max_new_tokens > self.max_len:
            raise ValueError(f"prompt of {prompt_length} tokens + {max_new_tokens} new tokens exceeds the "
                             f"context length {self.max_len}")

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                 sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(temperature=0.0),
                 *, num_samples: int = 1, seeds: int | Sequence[int] = 0, stop_ids: Sequence[int] = (),
                 params: Any | None = None, pad_samples_to: int | None = None,
                 cancelled: Callable[[], bool] | None = None, check_every: int = 16) -> Completions:
        """Complete every prompt (token ids) num_samples times.

        max_new_tokens, sampling: one for all prompts or one per prompt; seeds: one per prompt, or a base seed
        (prompt i then uses base + i); a row's tokens depend only on its prompt, seed, sample index and settings.
        stop_ids are added to the engine's own. params: weights to use instead of the engine's (an RL trainer
        passes its current ones; same shapes and shardings, so nothing recompiles or moves).
        pad_samples_to: run this many samples per prompt (>= num_samples) and drop the extra ones, which are
        finished from the start: a caller whose num_samples varies (a server's `n`) passes a bucket of it, so a
        new num_samples re-uses a compiled program.
        cancelled: asked before the prefill and after every `check_every` decode steps; when it returns True
        the generation stops there and `Cancelled` is raised (a server whose client went away).
        """
        n = len(prompts)
        if n == 0:
            raise ValueError("no prompts given")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        samples = num_samples if pad_samples_to is None else pad_samples_to
        if samples < num_samples:
            raise ValueError(f"pad_samples_to={pad_samples_to} is below num_samples={num_samples}")
        per_prompt = lambda x: list(x) if isinstance(x, Sequence) else [x] * n
        max_new, settings = per_prompt(max_new_tokens), per_prompt(sampling)
        seeds = list(seeds) if isinstance(seeds, Sequence) else [seeds + i for i in range(n)]
        for name, values in (("max_new_tokens", max_new), ("sampling", settings), ("seeds", seeds)):
            if len(values) != n:
                raise ValueError(f"{name}: {len(values)} values for {n} prompts")
        for i, (prompt, m) in enumerate(zip(prompts, max_new)):
            if m < 1:
                raise ValueError(f"prompt {i}: max_new_tokens must be >= 1, got {m}")
            try:
                self.check_lengths(len(prompt), m)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None

        # Buckets: batch to a power of two that the data axes divide; prompt and new tokens to powers of two.
        batch = bucket(n, 1)
        batch = -(-batch // self.data_parallel) * self.data_parallel
        prompt_len, new_tokens = bucket(max(len(p) for p in prompts)), bucket(max(max_new))
        tokens = np.full((batch, prompt_len), self.pad_id, np.int32)
        lengths = np.zeros((batch,), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, prompt_len - len(p):] = p
            lengths[i] = len(p)
        fill = batch - n  # filler rows: empty prompt, no new tokens
        row_settings = [s for s in settings + [settings[0]] * fill for _ in range(samples)]
        row_max_new = np.repeat(np.asarray(max_new + [0] * fill, np.int32)[:, None], samples, axis=1)
        row_max_new[:, num_samples:] = 0  # samples beyond num_samples are finished from the start
        stops = sorted(set(self.stop_ids) | {int(i) for i in stop_ids})
        stop_array = np.full((-(-max(len(stops), 1) // _STOP_SLOTS) * _STOP_SLOTS,), -1, np.int32)
        stop_array[: len(stops)] = stops
        stacked = sampling_lib.stack_params(row_settings)

        put_rows = lambda x: jax.device_put(x, self._rows)
        params = self.params if params is None else params
        stop_array = jax.device_put(stop_array, self._replicated)
        stacked = {k: put_rows(v) for k, v in stacked.items()}
        # Without `cancelled`, all decode steps are one call and the host never waits between them.
        chunk = new_tokens if cancelled is None else max(1, check_every)
        cancelled = cancelled or (lambda: False)
        with sharding.activation_sharding(self.mesh, self.rules):
            if cancelled():
                raise Cancelled(0)
            state = self._prefill(
                params, put_rows(tokens), put_rows(lengths), put_rows(np.asarray(seeds + [0] * fill, np.int32)),
                put_rows(row_max_new.reshape(-1)), stop_array, stacked,
                num_samples=samples, new_tokens=new_tokens, pad_id=self.pad_id)
            for step in range(1, new_tokens, chunk):
                if cancelled():
                    raise Cancelled(step)
                state = self._decode(params, state, stop_array, stacked, np.int32(step + chunk),
                                     prompt_len=prompt_len, pad_id=self.pad_id)
                # Waiting for the chunk here also makes the next check see the time after it.
                if chunk < new_tokens and np.all(jax.device_get(state["done"])):
                    break
        out = jax.device_get({k: state[k] for k in ("tokens", "lengths", "logprobs", "sampling_logprobs",
                                                    "stopped")})
        keep = (np.arange(n)[:, None] * samples + np.arange(num_samples)).reshape(-1)  # rows of real samples
        width = max(max_new)
        return Completions(
            tokens=out["tokens"][keep, :width], lengths=out["lengths"][keep],
            logprobs=out["logprobs"][keep, :width], sampling_logprobs=out["sampling_logprobs"][keep, :width],
            stopped=out["stopped"][keep], truncated=any(s.truncated for s in settings), num_samples=num_samples)
