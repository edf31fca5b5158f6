"""The host side of continuous batching: sequences, their slots and pages, and what each engine step runs.

Every sequence is in one state: waiting (queued), prefilling (admitted: holds a slot and the pages of its known
tokens, which are written a chunk per step), running (decoding) or finished. A data shard has `slots` sequences
at most; a finished sequence's slot and pages go to the next waiting one at the next step. Sequences are
admitted in order, except that one waiting for a prefix another is still writing (a group's later samples)
lets those behind it go first while its slot stays reserved.

Pages are taken as sequences grow (before each decode call, for the steps it may run). When a shard runs out,
the sequence admitted last is preempted: its pages are released and it waits at the head of the queue; when
it is admitted again its tokens so far are prefilled again and it goes on drawing where it left off (the draw
of its t-th token depends only on t, see `paged`).

Stop strings are checked in text after each step; the sequence is cut after the token completing the first one
(`text.finish` then cuts the text at the string).
"""
from __future__ import annotations

import collections
import dataclasses
import enum
import itertools
from typing import Callable

import numpy as np

from alignment.generation.pages import PagePool, PrefixNode
from alignment.generation.sampling import SamplingParams, stack_params


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    """One sequence to generate: what was asked, then its state (written by the scheduler only).

    `listener(request)` is called on the engine's thread after every step that added tokens to it or ended it.
    """

    prompt: list[int]
    max_new: int
    sampling: SamplingParams
    seed: int
    sample: int = 0  # index among the samples of one prompt: the second part of the random key
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    listener: Callable[["Request"], None] | None = None
    generated: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    sampling_logprobs: list[float] = dataclasses.field(default_factory=list)
    stopped: bool = False  # ended with a stop token
    cancelled: bool = False  # set by `Engine.cancel` (any thread); the next step drops it
    error: str | None = None  # why it ended early when its step failed (`worker`)
    status: Status = Status.WAITING
    shard: int = -1
    pages: list[int] = dataclasses.field(default_factory=list)
    computed: int = 0  # tokens whose keys and values are in the pages
    pending: list[PrefixNode] = dataclasses.field(default_factory=list)  # registered pages it has yet to write
    admitted: int = -1  # admission order, for preemption

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclasses.dataclass
class Batch:
    """What one program call runs: rows [rows] laid out shard by shard (row r lies in shard r // per_shard);
    `sequences[r]` is None for a padding row."""

    sequences: list[Request | None]
    per_shard: int


def bucket(n: int, minimum: int = 1) -> int:
    """The static size used for n: the next power of two, at least `minimum`."""
    return max(minimum, 1 << max(0, (max(n, 1) - 1).bit_length()))


def fine_bucket(n: int, minimum: int = 1) -> int:
    """The next size of the form 2^k or 3 * 2^(k-1) (1, 2, 3, 4, 6, 8, 12, ...), at least `minimum`: for sizes
    whose waste costs in proportion (pages per row, which every decode step reads), at twice the buckets."""
    power = bucket(n)
    return max(minimum, power * 3 // 4 if power >= 4 and n <= power * 3 // 4 else power)


class Scheduler:
    def __init__(self, shards: int, slots: int, pages: int, page_size: int, *, steps: int, prefill_chunk: int,
                 prefill_tokens: int, min_rows: int = 8, min_pages: int = 4,
                 detokenize: Callable[[list[int]], str] | None = None):
        """shards: data shards; slots, pages: per shard; steps: decode steps per call; prefill_chunk: prompt
        tokens a row prefills per call, prefill_tokens: tokens per prefill call (rows x chunk bucket);
        min_rows, min_pages: smallest buckets of rows per call and pages per row; detokenize: for stop strings."""
        self.shards, self.slots, self.page_size, self.steps = shards, slots, page_size, steps
        self.prefill_chunk, self.prefill_tokens = prefill_chunk, prefill_tokens
        self.min_rows, self.min_pages, self.detokenize = min_rows, min_pages, detokenize
        self.pools = [PagePool(pages, page_size) for _ in range(shards)]
        self.waiting: collections.deque[Request] = collections.deque()
        self.active: list[list[Request]] = [[] for _ in range(shards)]  # prefilling and running, per shard
        self._order = itertools.count()
        self.preemptions = 0
        self.prefilled = 0  # prompt (and resumed) tokens computed by prefill calls
        self.peak_running = 0  # most sequences in one decode call

    # ---- requests
    def capacity_error(self, prompt_len: int, max_new: int) -> str | None:
        """Why a sequence of this size can never run here, or None."""
        need = -(-(prompt_len + max_new) // self.page_size)
        if need > self.pools[0].num_pages - 1:
            return (f"prompt of {prompt_len} tokens + {max_new} new tokens needs {need} KV pages of "
                    f"{self.page_size} tokens; the cache holds {self.pools[0].num_pages - 1} per data shard")
        return None

    def add(self, sequence: Request) -> None:
        self.waiting.append(sequence)

    def has_work(self) -> bool:
        return bool(self.waiting) or any(self.active)

    def drop_cancelled(self) -> list[Request]:
        """Ends every cancelled sequence (its pages freed); returns them."""
        gone = [s for s in self.waiting if s.cancelled]
        self.waiting = collections.deque(s for s in self.waiting if not s.cancelled)
        for shard in self.active:
            for s in [s for s in shard if s.cancelled]:
                self._release(s)
                gone.append(s)
        for s in gone:
            s.status = Status.FINISHED
        return gone

    def forget_prefixes(self) -> None:
        """No later sequence shares what is in the cache now (it was computed with other weights)."""
        for pool in self.pools:
            pool.forget_prefixes()

    # ---- admission
    def admit(self) -> int:
        """Gives free slots to waiting sequences, in order (see the module docstring); returns how many."""
        reserved, kept, admitted = [0] * self.shards, collections.deque(), 0
        while self.waiting:
            s = self.waiting.popleft()
            outcome = self._place(s, reserved)
            admitted += outcome == "admitted"
            if outcome != "admitted":
                kept.append(s)
            if outcome == "blocked":
                break
        kept.extend(self.waiting)
        self.waiting = kept
        return admitted

    def _place(self, s: Request, reserved: list[int]) -> str:
        """'admitted', 'deferred' (a prefix it would share is being written: its slot is reserved) or 'blocked'."""
        tokens = s.tokens
        limit = len(tokens) - 1  # the last token is always computed: its logits draw the next one
        best = None
        for shard in range(self.shards):
            if len(self.active[shard]) + reserved[shard] >= self.slots:
                continue
            found = self.pools[shard].lookup(tokens, limit)
            ready = list(itertools.takewhile(lambda n: n.ready, found))
            if len(ready) < len(found):
                reserved[shard] += 1
                return "deferred"
            score = (len(ready), self.pools[shard].available(), -len(self.active[shard]))
            if best is None or score > best[0]:
                best = (score, shard, ready)
        if best is None:
            return "blocked"
        _, shard, shared = best
        pool = self.pools[shard]
        need = -(-len(tokens) // self.page_size) - len(shared)
        # Keep a page per sequence of the shard in hand, so admitting does not force a preemption at once.
        if pool.available_after_sharing([n.page for n in shared]) < need + len(self.active[shard]):
            return "blocked"
        pool.share([n.page for n in shared])
        fresh = pool.take(need)
        s.pages = [n.page for n in shared] + fresh
        s.pending = pool.register(s.prompt, fresh, len(shared), shared[-1] if shared else None)
        s.computed = len(shared) * self.page_size
        s.shard, s.status, s.admitted = shard, Status.PREFILLING, next(self._order)
        self.active[shard].append(s)
        return "admitted"

    # ---- prefill
    def prefill_batch(self) -> tuple[Batch, int] | None:
        """The prefilling sequences that run in the next prefill call and its chunk bucket T, or None."""
        candidates = [[s for s in shard if s.status is Status.PREFILLING] for shard in self.active]
        if not any(candidates):
            return None
        chunk = lambda s: min(len(s.tokens) - s.computed, self.prefill_chunk)
        width = bucket(max(chunk(s) for shard in candidates for s in shard), 16)
        width = min(width, bucket(self.prefill_chunk, 16))
        rows = max(1, self.prefill_tokens // width // self.shards)
        chosen = [shard[:rows] for shard in candidates]
        return self._layout(chosen), width

    def prefill_inputs(self, batch: Batch, width: int) -> dict[str, np.ndarray]:
        """Host arrays of a prefill call (see `paged.prefill_program`), plus "ends" [rows]: each row's chunk end."""
        n = len(batch.sequences)
        tokens = np.zeros((n, width), np.int32)
        positions = np.full((n, width), -1, np.int32)
        kv_lens, last, ends = (np.zeros((n,), np.int32) for _ in range(3))
        table = self._table(batch, [s.computed + width if s else 0 for s in batch.sequences])
        for r, s in enumerate(batch.sequences):
            if s is None:
                continue
            all_tokens = s.tokens
            end = min(len(all_tokens), s.computed + min(width, self.prefill_chunk))
            count = end - s.computed
            tokens[r, :count] = all_tokens[s.computed:end]
            positions[r, :count] = np.arange(s.computed, end)
            kv_lens[r], last[r], ends[r] = end, count - 1, end
        return dict(tokens=tokens, positions=positions, page_table=table, kv_lens=kv_lens, last=last,
                    **self._draw_inputs(batch), ends=ends)

    def finish_prefill(self, batch: Batch, ends: np.ndarray, drawn: dict[str, np.ndarray]) -> list[Request]:
        """Applies a prefill call's results; returns the sequences that changed (drew a token or finished)."""
        changed = []
        for r, s in enumerate(batch.sequences):
            if s is None:
                continue
            self.prefilled += int(ends[r]) - s.computed
            s.computed = int(ends[r])
            written = [n for n in s.pending if (s.pages.index(n.page) + 1) * self.page_size <= s.computed]
            PagePool.mark_ready(written)
            s.pending = [n for n in s.pending if n not in written]
            if s.computed < len(s.tokens):
                continue
            s.status = Status.RUNNING
            self._append(s, [int(drawn["tokens"][r])], [float(drawn["logprobs"][r])],
                         [float(drawn["sampling_logprobs"][r])], stop=int(drawn["tokens"][r]) in s.stop_ids)
            changed.append(s)
        return changed

    # ---- decode
    def decode_batch(self) -> Batch | None:
        """The running sequences, each with pages for the steps of the next decode call (preempting the latest
        admitted ones of a shard that runs out), or None when nothing runs."""
        for shard in range(self.shards):
            running = sorted((s for s in self.active[shard] if s.status is Status.RUNNING), key=lambda s: s.admitted)
            for s in running:
                if s.status is Status.RUNNING:  # not preempted meanwhile
                    self._grow(s)
        chosen = [[s for s in shard if s.status is Status.RUNNING] for shard in self.active]
        self.peak_running = max(self.peak_running, sum(map(len, chosen)))
        return self._layout(chosen) if any(chosen) else None

    def decode_steps(self, s: Request) -> int:
        return min(self.steps, s.max_new - len(s.generated))

    def _grow(self, s: Request) -> None:
        pool = self.pools[s.shard]
        need = -(-(s.computed + self.decode_steps(s)) // self.page_size) - len(s.pages)
        while need > pool.available():
            victim = max(self.active[s.shard], key=lambda v: v.admitted)
            self._preempt(victim)
            if victim is s:
                return
        if need > 0:
            s.pages += pool.take(need)

    def _preempt(self, s: Request) -> None:
        self._release(s)
        s.status, s.computed = Status.WAITING, 0
        self.waiting.appendleft(s)
        self.preemptions += 1

    def decode_inputs(self, batch: Batch) -> dict[str, np.ndarray]:
        """Host arrays of a decode call (see `paged.decode_program`)."""
        n = len(batch.sequences)
        # Every row's table covers `steps` more positions, also past its own pages (the scratch page): a finished
        # row keeps writing garbage at its next positions until the call ends, which must stay inside its table.
        ends = [s.computed + self.steps if s else self.steps for s in batch.sequences]
        out = dict(tokens=np.zeros((n,), np.int32), kv_lens=np.zeros((n,), np.int32), active=np.zeros((n,), bool),
                   max_new=np.zeros((n,), np.int32), stop_ids=np.full((n, self.stop_slots(batch)), -1, np.int32),
                   page_table=self._table(batch, ends), **self._draw_inputs(batch))
        for r, s in enumerate(batch.sequences):
            if s is None:
                continue
            out["tokens"][r], out["kv_lens"][r], out["active"][r] = s.generated[-1], s.computed, True
            out["max_new"][r] = s.max_new
            out["stop_ids"][r, :len(s.stop_ids)] = s.stop_ids
        return out

    def stop_slots(self, batch: Batch) -> int:
        return bucket(max([len(s.stop_ids) for s in batch.sequences if s] + [1]), 8)

    def finish_decode(self, batch: Batch, out: dict[str, np.ndarray]) -> list[Request]:
        changed = []
        for r, s in enumerate(batch.sequences):
            count = int(out["counts"][r]) if s is not None else 0
            if count == 0:
                continue
            s.computed += count
            self._append(s, out["tokens"][r, :count].tolist(), out["logprobs"][r, :count].tolist(),
                         out["sampling_logprobs"][r, :count].tolist(), stop=bool(out["stopped"][r]))
            changed.append(s)
        return changed

    # ---- shared
    def _append(self, s: Request, tokens: list[int], logprobs: list[float], sampling_logprobs: list[float],
                stop: bool) -> None:
        """New tokens of s; ends it on a stop token, its token limit, or a stop string in its text."""
        s.generated += tokens
        s.logprobs += logprobs
        s.sampling_logprobs += sampling_logprobs
        s.stopped = stop
        cut = self._stop_string_end(s)
        if cut is not None:
            del s.generated[cut:], s.logprobs[cut:], s.sampling_logprobs[cut:]
            s.stopped = False
        if stop or cut is not None or len(s.generated) >= s.max_new:
            self._release(s)
            s.status = Status.FINISHED

    def _stop_string_end(self, s: Request) -> int | None:
        """Tokens to keep when a stop string appears in s's text: up to the one completing it; else None."""
        if not s.stop_strings:
            return None
        body = s.generated[:-1] if s.stopped else s.generated
        if not any(stop in self.detokenize(body) for stop in s.stop_strings):
            return None
        return next(n for n in range(1, len(body) + 1)
                    if any(stop in self.detokenize(body[:n]) for stop in s.stop_strings))

    def _release(self, s: Request) -> None:
        if s in self.active[s.shard]:
            self.active[s.shard].remove(s)
        self.pools[s.shard].release(s.pages)
        s.pages, s.pending = [], []

    def _layout(self, chosen: list[list[Request]]) -> Batch:
        per_shard = bucket(max(len(c) for c in chosen), max(1, self.min_rows // self.shards))
        rows = [s for c in chosen for s in c + [None] * (per_shard - len(c))]
        return Batch(rows, per_shard)

    def _table(self, batch: Batch, ends: list[int]) -> np.ndarray:
        """[rows, P] page tables (scratch page 0 past a row's pages), P a bucket covering every row's positions
        below its entry of `ends`."""
        width = fine_bucket(max(-(-e // self.page_size) for e in ends), self.min_pages)
        table = np.zeros((len(batch.sequences), width), np.int32)
        for r, s in enumerate(batch.sequences):
            if s is not None:
                table[r, :len(s.pages)] = s.pages[:width]
        return table

    def _draw_inputs(self, batch: Batch) -> dict[str, np.ndarray]:
        default = SamplingParams(temperature=0.0)
        settings = stack_params([s.sampling if s else default for s in batch.sequences])
        return dict(seeds=np.asarray([s.seed if s else 0 for s in batch.sequences], np.int32),
                    samples=np.asarray([s.sample if s else 0 for s in batch.sequences], np.int32),
                    drawn=np.asarray([len(s.generated) if s else 0 for s in batch.sequences], np.int32),
                    settings=settings)

    def stats(self) -> dict:
        return {"peak_pages": max(p.peak_in_use for p in self.pools), "preemptions": self.preemptions,
                "prefilled_tokens": self.prefilled, "peak_running": self.peak_running}
