"""Metrics to TensorBoard event files and a JSONL log in the workdir (process 0 only), plus MFU."""
from __future__ import annotations

import json
import os
import time
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak TFLOP/s per chip, for MFU; devices not listed are measured (CPU) or need the config value.
KNOWN_PEAK_TFLOPS = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
    "NVIDIA A100": 312.0,
}


def measure_matmul_tflops(size: int = 1024, repeats: int = 5, dtype: str = "float32") -> float:
    """The device's achieved matmul TFLOP/s (median) in the compute dtype `dtype`, the MFU ceiling on CPU. A
    low-precision matmul accumulates in float32, as the model's projections do (alignment.models.precision)."""
    x = jnp.ones((size, size), jnp.dtype(dtype))
    accumulate = None if dtype == "float32" else jnp.float32
    f = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=accumulate))
    f(x).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / float(np.median(times)) / 1e12


def peak_tflops_per_device(configured: float = 0.0, dtype: str = "float32") -> float:
    """The MFU denominator for compute dtype `dtype`: `configured` if set, else the table's bf16 figure for a known
    accelerator computing in bf16/fp16, else measured (CPUs, and float32 compute anywhere)."""
    if configured > 0:
        return configured
    kind = jax.devices()[0].device_kind
    for name, tflops in KNOWN_PEAK_TFLOPS.items():
        if kind.startswith(name) and dtype != "float32":
            return tflops
    return measure_matmul_tflops(dtype=dtype)


class MetricsWriter:
    """Writes scalars to `workdir/metrics.jsonl` and TensorBoard events in `workdir/tensorboard`."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        from tensorboardX import SummaryWriter  # imported lazily: only process 0 writes

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

    def write(self, step: int, scalars: Mapping[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in scalars.items()}
        for key, value in values.items():
            self._tb.add_scalar(f"{prefix}/{key}", value, step)
        self._jsonl.write(json.dumps({"step": step, "split": prefix, **values}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
