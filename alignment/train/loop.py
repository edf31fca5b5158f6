"""The one training loop every stage uses: steps, metrics, evaluation, checkpoints, profiler trace."""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from tqdm import tqdm

from alignment.train.metrics import MetricsWriter
from alignment.train.preemption import PreemptionGuard

logger = logging.getLogger(__name__)


class Preempted(Exception):
    """The run stopped early on SIGTERM after checkpointing `step`; the next start resumes from it."""

    def __init__(self, step: int):
        super().__init__(f"preempted after step {step}; checkpoint saved, restart to resume")
        self.step = step


class TooManyBadSteps(Exception):
    """K consecutive steps had a NaN/Inf loss or gradient; the last checkpoint is the last good state."""


class BadStepCounter:
    """Counts skipped (non-finite) steps and stops the run after `limit` in a row."""

    def __init__(self, limit: int):
        self.limit, self.consecutive, self.total = limit, 0, 0

    def update(self, skipped: np.ndarray, last_step: int) -> None:
        for flag in skipped:
            self.consecutive = self.consecutive + 1 if flag else 0
            self.total += int(bool(flag))
        if self.limit and self.consecutive >= self.limit:
            raise TooManyBadSteps(
                f"{self.consecutive} consecutive steps up to step {last_step} had a NaN/Inf loss or gradient "
                f"(limit config.max_consecutive_bad_steps={self.limit}); their updates were skipped and the run "
                "stops here, with the last checkpoint intact. Lower the learning rate or inspect the data.")


class Profiler:
    """Captures an XLA trace for steps [start_step, start_step + num_steps) into workdir/profile."""

    def __init__(self, config: Any, workdir: str):
        self.enabled = bool(config.enabled)
        self.start, self.stop = config.start_step, config.start_step + config.num_steps
        self.directory = os.path.join(workdir, "profile")
        self.active = False

    def before_step(self, step: int) -> None:
        if self.enabled and step == self.start and not self.active:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after_step(self, step: int, state: Any) -> None:
        if self.active and step + 1 >= self.stop:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active = False
            logger.info("profiler trace written to %s", self.directory)


def train_loop(*, state: Any, train_step: Callable, batches: Iterator, num_steps: int, workdir: str,
               config: Any, flops_per_token: float, peak_flops: float, checkpointer: Any = None,
               data_state: Callable[[], dict] | None = None, eval_fn: Callable[[Any], dict] | None = None,
               tokens_key: str = "tokens") -> tuple[Any, dict]:
    """Run until `state.step == num_steps` (or SIGTERM); returns the final state and its held-out metrics.

    `batches` yields host batches already laid out for `train_step`; `data_state()` gives the
    iterator state saved with each checkpoint; `eval_fn(state)` returns held-out metrics.
    """
    writer = MetricsWriter(workdir)
    guard = PreemptionGuard()
    bad_steps = BadStepCounter(config.max_consecutive_bad_steps)
    profiler = Profiler(config.profile, workdir)
    start_step = int(state.step)
    accumulated: dict[str, list] = {}
    timing = {"data_wait_s": 0.0, "step_s": 0.0, "checkpoint_s": 0.0}
    window_start = time.perf_counter()
    bar = tqdm(total=num_steps, initial=start_step, disable=jax.process_index() != 0, dynamic_ncols=True)
    for step in range(start_step, num_steps):
        profiler.before_step(step)
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        state, metrics = train_step(state, batch)
        profiler.after_step(step, state)
        for key, value in metrics.items():
            accumulated.setdefault(key, []).append(value)
        timing["data_wait_s"] += t1 - t0
        done = step + 1
        if done % config.log_every == 0 or done == num_steps:
            values = {k: np.asarray(jax.device_get(v)) for k, v in accumulated.items()}  # waits for the step
            try:
                bad_steps.update(values["skipped"], done)
            except TooManyBadSteps:
                guard.close()
                writer.close()
                raise
            elapsed = time.perf_counter() - window_start
            timing["step_s"] = elapsed - timing["data_wait_s"] - timing["checkpoint_s"]
            steps_in_window = len(values[tokens_key])
            record = {k: float(np.mean(v)) for k, v in values.items()}
            if "slots" in values:
                record["token_utilisation"] = float(np.sum(values[tokens_key]) / np.sum(values["slots"]))
            tokens_per_s = float(np.sum(values[tokens_key])) / elapsed
            record["tokens_per_s"] = tokens_per_s
            record["mfu"] = tokens_per_s * flops_per_token / peak_flops
            record.update({k: v / steps_in_window for k, v in timing.items()})
            record["skipped_steps_total"] = bad_steps.total
            writer.write(done, record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            accumulated = {}
            timing = dict.fromkeys(timing, 0.0)
            window_start = time.perf_counter()
        bar.update(1)
        if eval_fn is not None and config.eval_every and done % config.eval_every == 0 and done != num_steps:
            writer.write(done, eval_fn(state), prefix="eval")
        if checkpointer is not None and config.checkpoint.every and done % config.checkpoint.every == 0:
            t2 = time.perf_counter()
            checkpointer.save(done, state, data_state() if data_state else None)
            timing["checkpoint_s"] += time.perf_counter() - t2
        if guard.should_stop(done) and done != num_steps:
            if checkpointer is not None:
                checkpointer.save(done, state, data_state() if data_state else None, force=True)
                checkpointer.wait()
            guard.close()
            writer.close()
            raise Preempted(done)
    bar.close()
    guard.close()
    final_eval = eval_fn(state) if eval_fn is not None else {}
    if final_eval:
        writer.write(num_steps, final_eval, prefix="eval")
    if checkpointer is not None and checkpointer.latest_step() != num_steps:
        checkpointer.save(num_steps, state, data_state() if data_state else None, force=True)
    if checkpointer is not None:
        checkpointer.wait()
    writer.close()
    return state, final_eval
