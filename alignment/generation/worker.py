"""An engine stepped on its own thread, for servers: requests come from many threads and share its batch.

    worker = Worker(engine, max_waiting=256)
    job = worker.submit(prompt_ids, 64, SamplingParams(temperature=0.7), seed=1, samples=2)
    for changed in worker.updates(job, timeout=0.1):   # on the request's thread
        ...                                            # a sequence grew or ended (None: `timeout` passed)
    worker.cancel(job)                                 # a departed client: slots and pages freed at the next step

`submit` raises `QueueFull` when `max_waiting` sequences already wait for a slot (a server answers 429), so a
burst cannot queue unbounded work. A failing step (a bug, a device error) ends every sequence in flight with
the error instead of stopping the thread: their waiters see `Sequence.error`.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from typing import Iterator, Sequence

from alignment.generation.engine import Engine
from alignment.generation.sampling import SamplingParams
from alignment.generation.scheduler import Request, Status

logger = logging.getLogger(__name__)
IDLE_WAIT_S = 0.05  # how long an idle worker sleeps before looking again for work (others may submit too)


class QueueFull(Exception):
    """More sequences wait for a slot than the worker accepts."""


@dataclasses.dataclass(eq=False)
class Job:
    """The sequences of one request (its `n` samples) and the queue their updates arrive on."""

    requests: list[Request]
    updates: queue.SimpleQueue = dataclasses.field(default_factory=queue.SimpleQueue)

    @property
    def done(self) -> bool:
        return all(r.finished or r.error for r in self.requests)


class Worker:
    def __init__(self, engine: Engine, max_waiting: int = 256):
        self.engine, self.max_waiting = engine, max_waiting
        self._wake = threading.Condition()
        self._jobs: set[Job] = set()  # unfinished
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="engine-worker", daemon=True)
        self._thread.start()

    def waiting(self) -> int:
        """Sequences submitted here and not yet holding a slot."""
        return sum(r.status is Status.WAITING for job in list(self._jobs) for r in job.requests)

    def submit(self, prompt: Sequence[int], max_new_tokens: int, sampling: SamplingParams, *, seed: int,
               samples: int = 1, stop_strings: Sequence[str] = (), stop_ids: Sequence[int] = ()) -> Job:
        """`samples` sequences of one prompt (sample indices 0 .. samples - 1, so they share its pages);
        QueueFull when they would take the waiting sequences past `max_waiting`; ValueError for a request that
        cannot run (`Engine.check_lengths`)."""
        with self._wake:
            if self.waiting() + samples > self.max_waiting:
                raise QueueFull(f"{self.waiting()} sequences are waiting for a slot (at most {self.max_waiting}); "
                                "retry shortly")
            self.engine.check_lengths(len(prompt), max_new_tokens)
            job = Job([])
            for g in range(samples):
                job.requests.append(self.engine.submit(prompt, max_new_tokens, sampling, seed=seed, sample=g,
                                                       stop_ids=stop_ids, stop_strings=stop_strings,
                                                       listener=job.updates.put))
            self._jobs.add(job)
            self._wake.notify()
        return job

    def updates(self, job: Job, timeout: float) -> Iterator[Request | None]:
        """Yields each sequence of `job` that grew or ended, until all have ended (or failed), and None after
        every `timeout` seconds without news (so the caller can check on its client)."""
        while not (job.done and job.updates.empty()):
            try:
                yield job.updates.get(timeout=timeout)
            except queue.Empty:
                yield None
        self._jobs.discard(job)

    def cancel(self, job: Job) -> None:
        """Ends a job (a departed client's); its slots and pages are freed at the next step."""
        for request in job.requests:
            self.engine.cancel(request)
        with self._wake:
            self._jobs.discard(job)
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self.engine.has_work():
                    self._wake.wait(IDLE_WAIT_S)
                if self._closed:
                    return
            try:
                self.engine.step()
            except Exception as e:  # noqa: BLE001  a failed step must not leave waiters hanging
                logger.exception("engine step failed; ending the sequences in flight")
                self._fail_all(f"{type(e).__name__}: {e}")

    def _fail_all(self, message: str) -> None:
        for job in list(self._jobs):
            for request in job.requests:
                request.error = message
                self.engine.cancel(request)
                job.updates.put(request)
        try:
            self.engine.step()  # drops the cancelled sequences and frees their pages
        except Exception:  # noqa: BLE001
            logger.exception("the engine could not drop the failed sequences")
