"""SIGTERM (the TPU/GKE/SLURM preemption notice) -> save at the next step boundary and exit cleanly."""
from __future__ import annotations

import logging
import signal
import threading

import jax

logger = logging.getLogger(__name__)


class PreemptionGuard:
    """Records SIGTERM instead of dying, so the loop can checkpoint first.

    With several processes every host must stop at the same step, so the decision goes through
    JAX's coordination service, which also learns of preemption notices on its own.
    """

    def __init__(self):
        self._requested = threading.Event()
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        logger.warning("SIGTERM received: saving a checkpoint at the next step boundary, then exiting")
        self._requested.set()

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step) or self._requested.is_set()
        return self._requested.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
