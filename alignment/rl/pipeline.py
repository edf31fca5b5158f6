"""Off-policy pipelining: rollouts made ahead of the trainer from parameters at most k updates old.

Version v of the policy is its parameters after v RL updates. The rollout of step s is sampled from version
    v(s) = max(s - k, first)        (k = rl.max_staleness; first = the version the run started or resumed at)
so its staleness s - v(s) is at most k, and which parameters sample which step depends on k alone, never on
timing: a run is deterministic given its seed, and k = 0 is the synchronous loop.

  k = 0: `next(step)` makes the rollout on the trainer's thread from the parameters just published.
  k > 0: a producer thread makes rollout s as soon as version v(s) is published, so while the trainer updates
         step t (version t published), the producer works on rollouts t+1 .. t+k.

The trainer, each step t: `next(t)` -> update -> (evaluation, `pending()` for a checkpoint) -> `publish(t + 1,
params, prompt_weights)`. Prompt-category weights published with version v apply to the draws of the rollouts
sampled from v on, so re-weighting is deterministic too. `pending()` waits until the producer has made every
rollout the published versions allow: a checkpoint then holds those rollouts, and the producer's prompt stream
is at the state that matches them (it waits for the next version). On resume they are restored, not
regenerated. The producer's and the trainer's busy intervals give the overlap `report()` states.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Sequence

from alignment.rl.producer import Rollout


def overlap_seconds(a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]]) -> float:
    """Total time two lists of disjoint, time-ordered (start, stop) intervals have in common."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


class Pipeline:
    """Rollouts of RL steps [start, end) by `produce(step, params, version) -> Rollout`, at most
    `max_staleness` versions behind; `pending`: rollouts of steps start, start + 1, ... made before a resume;
    `reweight(weights)`: sets the producer's prompt-category weights."""

    def __init__(self, produce: Callable[[int, Any, int], Rollout], max_staleness: int, start: int, end: int, *,
                 reweight: Callable[[dict], None], pending: Sequence[Rollout] = ()):
        self.produce, self.k, self.first, self.end, self.reweight = produce, max_staleness, start, end, reweight
        self._ready = {start + i: rollout for i, rollout in enumerate(pending)}
        self._next = start + len(pending)  # the next step whose rollout is to be made
        self._versions: dict[int, Any] = {}
        self._weights: list[tuple[int, dict]] = []  # (version, prompt weights) not yet applied
        self._making, self._closed, self._error = False, False, None
        self._cond = threading.Condition()
        self._busy = {"producer": [], "trainer": []}
        self._started = time.perf_counter()
        self._thread = None
        if self.k > 0:
            self._thread = threading.Thread(target=self._run, name="rollout-producer", daemon=True)
            self._thread.start()

    def version(self, step: int) -> int:
        """The version that samples step's rollout."""
        return max(step - self.k, self.first)

    def publish(self, version: int, params: Any, prompt_weights: dict | None = None) -> None:
        """Version `version`'s parameters (the producer's own copy when k > 0: the trainer donates its buffers)."""
        with self._cond:
            self._versions[version] = params
            if prompt_weights:
                self._weights.append((version, prompt_weights))
            for old in [v for v in self._versions if v < self.version(self._next)]:
                del self._versions[old]
            self._cond.notify_all()

    def next(self, step: int) -> Rollout:
        """The rollout of `step`, waiting for it when the producer is still at work on it."""
        if self.k == 0 and step not in self._ready:
            return self._make(step, keep=False)
        with self._cond:
            self._cond.wait_for(lambda: step in self._ready or self._error is not None)
            if self._error is not None:
                raise self._error
            return self._ready.pop(step)

    def pending(self) -> list[Rollout]:
        """The rollouts made and not yet taken, once the producer has made all that the published versions
        allow (it then waits for the next version, its prompt stream at the state that matches them)."""
        with self._cond:
            self._cond.wait_for(lambda: self._error is not None or not self._making and (
                self._next >= self.end or self.version(self._next) not in self._versions))
            if self._error is not None:
                raise self._error
            return [self._ready[step] for step in sorted(self._ready)]

    def trainer_busy(self, start: float, stop: float) -> None:
        """Record that the trainer worked (scoring, update) from `start` to `stop` (time.perf_counter)."""
        self._busy["trainer"].append((start, stop))

    def report(self) -> dict:
        """Seconds each side was busy, both at once, and the overlap as a fraction of the wall time so far."""
        wall = time.perf_counter() - self._started
        producer, trainer = (sum(b - a for a, b in self._busy[side]) for side in ("producer", "trainer"))
        both = overlap_seconds(self._busy["producer"], self._busy["trainer"])
        return {"max_staleness": self.k, "wall_s": wall, "producer_busy_s": producer, "trainer_busy_s": trainer,
                "overlap_s": both, "overlap_fraction": both / max(wall, 1e-9)}

    def close(self) -> None:
        """Stop the producer (after the rollout it is making, if any)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _make(self, step: int, keep: bool) -> Rollout:
        """Step's rollout, made from its version; `keep`: also put it among the ready ones (the thread's)."""
        version = self.version(step)
        with self._cond:
            params = self._versions[version]
            weights = [w for v, w in self._weights if v <= version]
            self._weights = [(v, w) for v, w in self._weights if v > version]
            self._making = True
        for prompt_weights in weights:
            self.reweight(prompt_weights)
        start = time.perf_counter()
        rollout = self.produce(step, params, version)
        stop = time.perf_counter()
        with self._cond:
            self._busy["producer"].append((start, stop))
            if keep:
                self._ready[step] = rollout
            self._next, self._making = step + 1, False
            self._cond.notify_all()
        return rollout

    def _run(self) -> None:
        try:
            while self._next < self.end:
                with self._cond:
                    step = self._next
                    self._cond.wait_for(lambda: self._closed or self.version(step) in self._versions)
                    if self._closed:
                        return
                self._make(step, keep=True)
        except BaseException as error:  # noqa: BLE001 - handed to the trainer, which raises it
            with self._cond:
                self._error, self._making = error, False
                self._cond.notify_all()
