"""The rollout engine: continuous batching over a paged KV cache, for RL rollouts, generation, evaluation and
serving alike.

    engine = Engine(model_config, params, mesh, rules, pad_id=tokenizer.pad_id, stop_ids=[tokenizer.eos_id])
    out = engine.generate(prompts, max_new_tokens=256, sampling=SamplingParams(temperature=1.0), num_samples=4)

A fixed number of sequences decode together (`slots`); a sequence that finishes hands its slot and its KV pages
to a waiting one at the next step, whose prompt is prefilled in chunks between decode calls, so long-tailed
completion lengths do not leave the batch idle (`scheduler`). The cache is paged: memory follows the tokens in
flight, pages are freed when a sequence ends, and sequences with the same prompt prefix (a group's samples,
requests sharing a system prompt) read the same prompt pages (`pages`). The device programs and their two ways
of attending over pages are in `paged`; every call's shapes are buckets (rows, pages per row, prompt chunk), so
each program compiles once per bucket.

Each sequence can have its own sampling settings, seed, token limit, stop tokens and stop strings; a token
depends only on its sequence's prompt, seed, sample index and settings, never on what else ran beside it or
when it joined. Log-probs are log softmax(logits / temperature) of each drawn token (temperature 1 for greedy),
exactly what `algorithms.logprobs.token_logprobs(..., temperature)` recomputes in the trainer. With top-k /
top-p / min-p truncation, tokens are drawn from the truncated distribution instead: `Completions.truncated`
says so and `sampling_logprobs` holds the log-probs under it.

`generate` runs the engine on the caller's thread until its requests are done. A server instead `submit`s
requests from many threads and steps the engine on one (`alignment.generation.worker`); both can share it.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import threading
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alignment import sharding
from alignment.generation import paged
from alignment.generation.sampling import SamplingParams
from alignment.generation.scheduler import Request, Scheduler
from alignment.models import ModelConfig, Transformer
from alignment_kernels.cpu_decode import api as cpu_decode
from alignment_kernels.paged_attention import api as paged_api


class Cancelled(Exception):
    """`Engine.generate` stopped because its `cancelled` callback said so, after `tokens` generated tokens."""

    def __init__(self, tokens: int):
        super().__init__(f"generation cancelled after {tokens} generated tokens")
        self.tokens = tokens


@dataclasses.dataclass(frozen=True)
class Completions:
    """Generated tokens of R = prompts * num_samples rows; row i * num_samples + g is sample g of prompt i.

    tokens [R, max_new] int32 (pad_id after each row's length); lengths [R] count the tokens generated,
    including a final stop token; logprobs and sampling_logprobs [R, max_new] float32 (0 after the length, see
    the module docstring); stopped [R] bool: the row ended with a stop token (not its token limit or a stop
    string, which `text.finish` finds in the text).
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


class Engine:
    """Generation from a model whose parameters already lie on `mesh` (e.g. the trainer's own)."""

    def __init__(self, config: ModelConfig, params: Any, mesh: Mesh, rules: Mapping[str, Any], *, pad_id: int,
                 stop_ids: Sequence[int] = (), max_len: int | None = None,
                 detokenize: Callable[[list[int]], str] | None = None, slots: int = 128, page_size: int = 16,
                 pages: int | None = None, steps_per_call: int = 16, prefill_chunk: int = 256,
                 prefill_tokens: int = 4096, attention_impl: str | None = None, interpret: bool = False,
                 pack_weights: bool | None = None, min_rows: int | None = None):
        """stop_ids: tokens that end every sequence (EOS, end-of-turn); max_len: context limit, default the
        model's; detokenize: token ids -> text, for stop strings (`Tokenizer.decode` without special tokens).

        slots: sequences decoding at once (rounded up to a multiple of the data shards); page_size: tokens per KV
        page; pages: pages per data shard (default: 256 tokens per slot; when sequences need more, the latest
        admitted are preempted and recomputed later, so size it for the tokens in flight); steps_per_call:
        decode steps per device call (the host admits, streams and checks stop strings in between);
        prefill_chunk: prompt tokens a sequence prefills per call, prefill_tokens: tokens per prefill call;
        attention_impl: `kernels/paged_attention` implementation (default: the backend's), interpret: run a
        Pallas one in interpret mode (tests); pack_weights: decode with the CPU bfloat16 kernels
        (`alignment_kernels.cpu_decode`: a matmul over weights packed for it, attention over the dense copies);
        default: where they run (CPU with AVX512-BF16, bfloat16 compute, one device); min_rows: the smallest
        bucket of rows a program is compiled for (rows are rounded up to a power of two at least this): default
        1 on CPU, where a step's cost grows with its rows (one row decodes ~2x faster than eight), 8 on TPU /
        GPU, where fewer rows cost the same and each bucket is one more compile.
        """
        self.config, self.params, self.mesh, self.rules = config, params, mesh, dict(rules)
        self.model = Transformer(config)
        self.pad_id = int(pad_id)
        self.stop_ids = tuple(int(i) for i in stop_ids)
        self.max_len = int(max_len or config.max_position_embeddings)
        self.detokenize = detokenize
        layout = paged.Layout(mesh, rules)
        row_axes = layout.rows if isinstance(layout.rows, tuple) else () if layout.rows is None else (layout.rows,)
        shards = math.prod(mesh.shape[a] for a in row_axes)
        per_shard = -(-slots // shards)
        if pages is None:
            pages = per_shard * -(-min(self.max_len, 256) // page_size) + 1
        self.page_size, self.steps_per_call = page_size, steps_per_call
        impl, attention = paged_api.get_impl(attention_impl, interpret=interpret)
        self.attention_impl = impl
        if min_rows is None:
            min_rows = 1 if jax.default_backend() == "cpu" else 8
        self.scheduler = Scheduler(shards, per_shard, pages, page_size, steps=steps_per_call,
                                   prefill_chunk=prefill_chunk, prefill_tokens=prefill_tokens, min_rows=min_rows,
                                   detokenize=detokenize)
        self.pool = paged.init_pool(config, shards * pages, page_size, layout,
                                    paged.pool_dtype(config, paged.gathers_views(impl)))
        self._rows = NamedSharding(mesh, PartitionSpec(layout.rows))
        self._replicated = NamedSharding(mesh, PartitionSpec())
        # XLA:CPU copies every layer's weights out of the stacked parameters at each program call, which a call
        # every `steps_per_call` steps would pay again and again: there the split weights are kept between calls
        # (a second copy of the weights). On TPU and GPU the slices fuse into the matmuls.
        self._keep_weights = jax.default_backend() == "cpu"
        if pack_weights is None:
            pack_weights = (self._keep_weights and mesh.devices.size == 1 and jnp.dtype(config.dtype) == jnp.bfloat16
                            and cpu_decode.available())
        elif pack_weights and not (self._keep_weights and mesh.devices.size == 1):
            raise ValueError("pack_weights needs the CPU backend and a one-device mesh (the decode kernels are "
                             "CPU custom calls XLA cannot partition)")
        self.pack_weights = bool(pack_weights)
        self._prefill = jax.jit(functools.partial(paged.prefill_program, self.model, attention=attention,
                                                  layout=layout), donate_argnames=("pool",))
        self._decode = jax.jit(functools.partial(paged.decode_program, self.model, attention=attention,
                                                 views=paged.gathers_views(impl), layout=layout,
                                                 cpu_kernels=self.pack_weights),
                               static_argnames=("steps", "pad_id"), donate_argnames=("pool",))
        self._prepare = jax.jit(functools.partial(paged.prepare_weights, config=config, pack=self.pack_weights))
        self._prepared: tuple[Any, paged.Weights] | None = None  # (the params they came from, the weights)
        self._step_lock = threading.Lock()  # one step at a time, whoever drives the engine
        self._call_lock = threading.Lock()  # one `generate` at a time: each may step with its own weights
        self._inbox: collections.deque[Request] = collections.deque()  # submitted, not yet seen by a step
        self._cached_with = params  # the weights the prefix cache's pages were computed with

    @property
    def slots(self) -> int:
        return self.scheduler.slots * self.scheduler.shards

    def check_lengths(self, prompt_length: int, max_new_tokens: int) -> None:
        """ValueError when a prompt plus its new tokens exceed the context limit or the KV cache (requests are
        refused, not cut)."""
        if prompt_length < 1:
            raise ValueError("prompt is empty")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if prompt_length + max_new_tokens > self.max_len:
            raise ValueError(f"prompt of {prompt_length} tokens + {max_new_tokens} new tokens exceeds the "
                             f"context length {self.max_len}")
        problem = self.scheduler.capacity_error(prompt_length, max_new_tokens)
        if problem:
            raise ValueError(problem)

    def submit(self, prompt: Sequence[int], max_new_tokens: int, sampling: SamplingParams = SamplingParams(), *,
               seed: int = 0, sample: int = 0, stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
               listener: Callable[[Request], None] | None = None) -> Request:
        """Queues one sequence (any thread); it runs in the steps that follow. Cancel it with `cancel`.

        stop_ids are added to the engine's own; stop_strings end it once its text contains one (needs
        `detokenize`); listener(request) is called on the stepping thread whenever it grew or ended.
        """
        self.check_lengths(len(prompt), max_new_tokens)
        if stop_strings and self.detokenize is None:
            raise ValueError("stop strings need an engine built with detokenize")
        request = Request(list(prompt), int(max_new_tokens), sampling, int(seed), int(sample),
                          tuple(sorted(set(self.stop_ids) | {int(i) for i in stop_ids})),
                          tuple(s for s in stop_strings if s), listener)
        self._inbox.append(request)
        return request

    @staticmethod
    def cancel(request: Request) -> None:
        """Ends a submitted sequence at the next step (any thread); its pages are freed there."""
        request.cancelled = True

    def has_work(self) -> bool:
        return bool(self._inbox) or self.scheduler.has_work()

    def step(self, params: Any | None = None) -> None:
        """One round: admit waiting sequences, prefill a chunk of the admitted ones (and of those the prefill let
        in: a group's later samples), run one decode call, then tell the listeners. params: weights to use instead of the engine's (same shapes and shardings) for every
        sequence of this step; other weights than the last step's (an RL update) empty the prefix cache."""
        with self._step_lock:
            scheduler = self.scheduler
            while self._inbox:
                scheduler.add(self._inbox.popleft())
            changed = scheduler.drop_cancelled()
            params = self.params if params is None else params
            if params is not self._cached_with:  # cached prefixes hold other weights' keys and values
                scheduler.forget_prefixes()
                self._cached_with = params
            scheduler.admit()
            with sharding.activation_sharding(self.mesh, self.rules):
                planned = scheduler.prefill_batch()
                if planned is not None:
                    changed += self._run_prefill(self._weights(params), *planned)
                    # Samples that waited for the prompt pages just written join now, not a decode call later.
                    if scheduler.admit():
                        changed += self._run_prefill(self._weights(params), *scheduler.prefill_batch())
                batch = scheduler.decode_batch()
                if batch is not None:
                    changed += self._run_decode(self._weights(params), batch)
        for request in dict.fromkeys(changed):  # each once, in order
            if request.listener is not None:
                request.listener(request)

    def _weights(self, params) -> Any:
        """What the programs take: the params, or (on CPU) their `paged.prepare_weights`, made once per params."""
        if not self._keep_weights:
            return params
        if self._prepared is None or self._prepared[0] is not params:
            self._prepared = None  # the previous copy goes before the next is made: one at a time
            self._prepared = (params, self._prepare(params))
        return self._prepared[1]

    def _run_prefill(self, params, batch, width) -> list[Request]:
        inputs = self.scheduler.prefill_inputs(batch, width)
        ends = inputs.pop("ends")
        self.pool, drawn = self._prefill(params, self.pool, **self._on_rows(inputs))
        return self.scheduler.finish_prefill(batch, ends, jax.device_get(drawn))

    def _run_decode(self, params, batch) -> list[Request]:
        inputs = self._on_rows(self.scheduler.decode_inputs(batch))
        # With sequences waiting, stop once an eighth of the rows (at least one) finished, to hand their slots
        # over: fewer idle rows, without paying a call's fixed cost (gathering every row's pages) per finish.
        running = sum(s is not None for s in batch.sequences)
        exit_after = max(1, running // 8) if self.scheduler.waiting else running + 1
        self.pool, out = self._decode(params, self.pool, **inputs, until=np.int32(self.steps_per_call),
                                      exit_after=np.int32(exit_after), steps=self.steps_per_call,
                                      pad_id=self.pad_id)
        return self.scheduler.finish_decode(batch, jax.device_get(out))

    def _on_rows(self, inputs: dict) -> dict:
        put = lambda x: jax.device_put(x, self._rows)
        return {k: ({n: put(a) for n, a in v.items()} if isinstance(v, dict) else put(v)) for k, v in inputs.items()}

    def stats(self) -> dict:
        """peak_pages (most pages in use at once in a shard), preemptions, and the cache's bytes per page."""
        c = self.config
        page_bytes = 2 * c.num_layers * c.num_kv_heads * self.page_size * c.head_dim * self.pool["k"][0].dtype.itemsize
        return {**self.scheduler.stats(), "page_bytes": page_bytes}

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                 sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(temperature=0.0),
                 *, num_samples: int = 1, seeds: int | Sequence[int] = 0, stop_ids: Sequence[int] = (),
                 stop_strings: Sequence[str] = (), params: Any | None = None,
                 cancelled: Callable[[], bool] | None = None) -> Completions:
        """Complete every prompt (token ids) num_samples times, on this thread.

        max_new_tokens, sampling: one for all prompts or one per prompt; seeds: one per prompt, or a base seed
        (prompt i then uses base + i); a row's tokens depend only on its prompt, seed, sample index and settings.
        stop_ids are added to the engine's own; stop_strings end a row once its text holds one (the row keeps
        the tokens up to the one completing it). params: weights to use instead of the engine's (an RL trainer
        passes its current ones; same shapes and shardings, so nothing recompiles or moves).
        cancelled: asked before every step; when it returns True the call's sequences are dropped and
        `Cancelled` is raised. Concurrent calls run one after the other (sequences others `submit` share the
        steps, and the weights, of a running call).
        """
        n = len(prompts)
        if n == 0:
            raise ValueError("no prompts given")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        per_prompt = lambda x: list(x) if isinstance(x, Sequence) else [x] * n
        max_new, settings = per_prompt(max_new_tokens), per_prompt(sampling)
        seeds = list(seeds) if isinstance(seeds, Sequence) else [seeds + i for i in range(n)]
        for name, values in (("max_new_tokens", max_new), ("sampling", settings), ("seeds", seeds)):
            if len(values) != n:
                raise ValueError(f"{name}: {len(values)} values for {n} prompts")
        for i, (prompt, m) in enumerate(zip(prompts, max_new)):
            try:
                self.check_lengths(len(prompt), m)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        with self._call_lock:
            requests = [self.submit(prompt, m, s, seed=seed, sample=g, stop_ids=stop_ids, stop_strings=stop_strings)
                        for prompt, m, s, seed in zip(prompts, max_new, settings, seeds) for g in range(num_samples)]
            while not all(r.finished for r in requests):
                if cancelled is not None and cancelled():
                    for r in requests:
                        self.cancel(r)
                    self.step(params)  # drops them and frees their pages
                    raise Cancelled(sum(len(r.generated) for r in requests))
                self.step(params)
        return _completions(requests, max(max_new), self.pad_id, any(s.truncated for s in settings), num_samples)


def _completions(requests: list[Request], width: int, pad_id: int, truncated: bool, num_samples: int) -> Completions:
    rows = len(requests)
    tokens = np.full((rows, width), pad_id, np.int32)
    logprobs, sampling_logprobs = np.zeros((rows, width), np.float32), np.zeros((rows, width), np.float32)
    for r, request in enumerate(requests):
        n = len(request.generated)
        tokens[r, :n], logprobs[r, :n] = request.generated, request.logprobs
        sampling_logprobs[r, :n] = request.sampling_logprobs
    return Completions(tokens=tokens, lengths=np.asarray([len(r.generated) for r in requests], np.int32),
                       logprobs=logprobs, sampling_logprobs=sampling_logprobs,
                       stopped=np.asarray([r.stopped for r in requests], bool), truncated=truncated,
                       num_samples=num_samples)
