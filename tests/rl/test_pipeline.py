"""The rollout pipeline without a model: which version samples which step, how far the producer runs ahead,
what a checkpoint keeps, prompt re-weighting, errors, and the overlap measure."""
import threading
import time

import pytest

from alignment.rl.pipeline import Pipeline, overlap_seconds
from alignment.rl.producer import Rollout


class Recorder:
    """produce(step, params, version): records what it was given and, with `published`, how far the trainer
    had got when it ran; its rollout carries the step in prompt_ids and the prompt weights then in force."""

    def __init__(self, seconds: float = 0.0):
        self.calls, self.weights, self.seconds = [], {"math": 1.0}, seconds
        self.trainer_step = 0

    def __call__(self, step, params, version):
        assert params == f"params-{version}", (step, params, version)
        self.calls.append((step, version, self.trainer_step))
        time.sleep(self.seconds)
        return Rollout(prompt_ids=[[step]], out=None, rewards=None, version=version,
                       stats={"weights": dict(self.weights)})

    def reweight(self, weights):
        self.weights = dict(weights)


def train(pipeline, recorder, start, end, stop_at=None, weights_at=None):
    """The trainer's side of loop.run: returns the rollouts taken, and pipeline.pending() at `stop_at`."""
    taken, pending = [], None
    pipeline.publish(start, f"params-{start}")
    for step in range(start, end):
        recorder.trainer_step = step
        rollout = pipeline.next(step)
        taken.append(rollout)
        time.sleep(0.002)  # "the update"
        weights = {"math": 0.5, "code": 2.0} if step + 1 == weights_at else None
        if step + 1 == stop_at:
            pending = pipeline.pending()
            break
        if step + 1 < end:
            pipeline.publish(step + 1, f"params-{step + 1}", weights)
    pipeline.close()
    return taken, pending


@pytest.mark.parametrize("k", [0, 1, 3])
def test_each_step_is_sampled_by_version_max_of_step_minus_k_and_the_producer_runs_at_most_k_ahead(k):
    recorder = Recorder()
    pipeline = Pipeline(recorder, k, 0, 10, reweight=recorder.reweight)
    taken, _ = train(pipeline, recorder, 0, 10)
    assert [r.prompt_ids[0][0] for r in taken] == list(range(10))
    assert [r.version for r in taken] == [max(s - k, 0) for s in range(10)]
    assert [s for s, _, _ in recorder.calls] == list(range(10))  # each rollout made once, in order
    for step, version, trainer_step in recorder.calls:
        assert step - trainer_step <= k  # never more than k steps ahead of the update in progress
    if k == 0:
        assert all(step == trainer_step for step, _, trainer_step in recorder.calls)  # inline, synchronous


def test_a_checkpoint_keeps_the_rollouts_in_flight_and_resuming_from_them_changes_nothing():
    k = 2
    full_recorder = Recorder()
    full, _ = train(Pipeline(full_recorder, k, 0, 9, reweight=full_recorder.reweight), full_recorder, 0, 9)
    recorder = Recorder(seconds=0.01)  # slower than the trainer: pending() must wait for rollout 6
    first, pending = train(Pipeline(recorder, k, 0, 9, reweight=recorder.reweight), recorder, 0, 9, stop_at=5)
    # Stopped after step 4's update (version 5 not published): rollouts 5 and 6 (versions 3, 4) are in flight.
    assert [(r.prompt_ids[0][0], r.version) for r in pending] == [(5, 3), (6, 4)]
    resumed_recorder = Recorder()
    resumed, _ = train(Pipeline(resumed_recorder, k, 5, 9, reweight=resumed_recorder.reweight, pending=pending),
                       resumed_recorder, 5, 9)
    assert [(r.prompt_ids[0][0], r.version) for r in first + resumed] == \
        [(r.prompt_ids[0][0], r.version) for r in full]
    assert [s for s, _, _ in resumed_recorder.calls] == [7, 8]  # the restored ones are not made again


def test_prompt_weights_apply_from_the_version_they_are_published_with():
    for k in (0, 2):
        recorder = Recorder()
        taken, _ = train(Pipeline(recorder, k, 0, 8, reweight=recorder.reweight), recorder, 0, 8, weights_at=3)
        changed = [r.prompt_ids[0][0] for r in taken if r.stats["weights"] != {"math": 1.0}]
        assert changed == list(range(3 + k, 8)), k  # the rollouts sampled from version 3 on


def test_a_producer_error_reaches_the_trainer():
    def failing(step, params, version):
        if step == 2:
            raise ValueError("reward function exploded")
        return Rollout([[step]], None, None, version)

    pipeline = Pipeline(failing, 1, 0, 5, reweight=lambda w: None)
    pipeline.publish(0, "p0")
    pipeline.next(0)
    pipeline.publish(1, "p1")
    pipeline.next(1)
    pipeline.publish(2, "p2")
    with pytest.raises(ValueError, match="exploded"):
        pipeline.next(2)
    pipeline.close()


def test_close_stops_a_producer_waiting_for_parameters():
    pipeline = Pipeline(Recorder(), 1, 0, 5, reweight=lambda w: None)
    pipeline.publish(0, "params-0")
    pipeline.next(0)
    closer = threading.Thread(target=pipeline.close)
    closer.start()
    closer.join(timeout=10)
    assert not closer.is_alive()


def test_overlap_is_the_time_both_sides_are_busy():
    assert overlap_seconds([(0, 2), (3, 5)], [(1, 4)]) == pytest.approx(2.0)
    assert overlap_seconds([(0, 1)], [(1, 2)]) == 0.0
    recorder = Recorder(seconds=0.05)
    pipeline = Pipeline(recorder, 1, 0, 4, reweight=recorder.reweight)
    pipeline.publish(0, "params-0")
    for step in range(4):
        rollout = pipeline.next(step)
        start = time.perf_counter()
        time.sleep(0.05)  # an update as long as a rollout: the producer makes the next one meanwhile
        pipeline.trainer_busy(start, time.perf_counter())
        if step < 3:
            pipeline.publish(step + 1, f"params-{step + 1}")
        assert rollout.version == max(step - 1, 0)
    report = pipeline.report()
    pipeline.close()
    assert report["overlap_s"] > 0.05 and 0 < report["overlap_fraction"] < 1
    assert report["producer_busy_s"] >= 0.2 and report["trainer_busy_s"] >= 0.2
