"""Merge checkpoints tensor by tensor: read one layer slice of every model, merge it, write it, drop it.

Peak memory is a few tensors per worker, never the model: each unit of work holds its estimated bytes
in a shared budget, so workers run in parallel only while their tensors fit (a unit larger than the
budget runs alone). Everything is checked before the first byte is written: method, base, parameters,
output paths, and that every checkpoint has the same tensor names, shapes and dtypes. NaN or Inf in an
input aborts the merge, naming the checkpoint and tensor; outputs appear only when complete.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import os
import threading
import time
import zlib
from typing import Any, Mapping, Sequence

import numpy as np

from alignment.merge import io
from alignment.merge.methods import METHODS
from alignment.merge.params import make_spec
from alignment.models.config import ModelConfig

logger = logging.getLogger(__name__)


class _Budget:
    """Bytes that units of work in flight may hold; a unit over the whole budget waits to run alone."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._cond = threading.Condition()

    def acquire(self, nbytes: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.used == 0 or self.used + nbytes <= self.limit)
            self.used += nbytes

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.used -= nbytes
            self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self, nbytes: int):
        self.acquire(nbytes)
        try:
            yield
        finally:
            self.release(nbytes)


def _check_finite(array: np.ndarray, label: str, name: str, layer: int | None) -> None:
    # A sum is one cheap pass and is non-finite whenever an entry is; only then is the exact test paid for.
    if not np.isfinite(array.sum(dtype=np.float32)) and not np.isfinite(array).all():
        where = name if layer is None else f"{name} (layer {layer})"
        first = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
        raise ValueError(f"{label}: tensor {where} contains NaN or Inf (first at index {first}); nothing was written")


def merge_checkpoints(models: Sequence[str], method: str, base: str = "", output: str = "", hf_output: str = "",
                      params: Mapping[str, Any] | None = None, overrides: Sequence = (), seed: int = 0,
                      overwrite: bool = False, workers: int = 0, memory_budget_bytes: int = 1 << 30,
                      model_config: ModelConfig | None = None, model_type: str = "llama",
                      max_shard_bytes: int | None = None) -> dict[str, Any]:
    """Merge `models` (Orbax checkpoints or HF directories) with `method`; returns a summary dict.

    output: Orbax checkpoint directory (step 0, readable by `alignment.checkpoint.load_params`);
    hf_output: HF safetensors directory; at least one is required. params/overrides: see
    `alignment.merge.params`. seed: DARE masks depend on it, the tensor name and layer (not on order or
    workers). workers: threads for HF-only output, 0 = one per CPU (Orbax output runs in Orbax's threads,
bounded by the same memory budget). model_config: names HF tensors when HF output is made
    from Orbax inputs only.
    """
    start = time.perf_counter()
    if method not in METHODS:
        make_spec(method, len(models), {})  # raises with the nearest method name
    spec_method = METHODS[method]
    if len(models) < spec_method.min_models or (spec_method.max_models and len(models) > spec_method.max_models):
        wanted = (f"exactly {spec_method.min_models}" if spec_method.max_models == spec_method.min_models
                  else f"at least {spec_method.min_models}")
        raise ValueError(f"merge method {method!r} takes {wanted} models, got {len(models)}")
    if spec_method.needs_base and not base:
        raise ValueError(f"merge method {method!r} works on task vectors (model - base): set the base checkpoint")
    if base and not spec_method.needs_base:
        logger.warning("merge method %r does not use a base; %s is ignored", method, base)
        base = ""
    if not output and not hf_output:
        raise ValueError("set an output: an Orbax checkpoint directory and/or an HF safetensors directory")
    inputs = {os.path.abspath(p) for p in [*models, base] if p}
    for out in (output, hf_output):
        if out and os.path.abspath(out) in inputs:
            raise ValueError(f"output {out} is one of the inputs")
        if out and os.path.exists(out) and not overwrite:
            raise FileExistsError(f"output {out} exists; set overwrite to replace it")
    spec = make_spec(method, len(models), dict(params or {}), overrides)

    labels = {f"model {i} ({p})": p for i, p in enumerate(models)}
    if base:
        labels[f"base ({base})"] = base
    sources = {label: io.open_source(path) for label, path in labels.items()}
    with contextlib.ExitStack() as cleanup:
        for source in sources.values():
            cleanup.callback(source.close)
        tensors = io.check_same_tensors(sources)
        unmatched = spec.unmatched_patterns(list(tensors))
        if unmatched:
            raise ValueError(f"override patterns match no tensor: {unmatched}; tensors: {sorted(tensors)}")
        num_layers = next((t.shape[0] for t in tensors.values() if t.stacked), 1)
        # HF -> HF merges stay in HF's layout; anything touching Orbax uses the project layout.
        layout = "hf" if not output and all(s.kind == "hf" for s in sources.values()) else "project"

        def read(name: str, layer: int | None) -> list[np.ndarray]:
            """That tensor (or layer slice) of every source, models first, checked for NaN/Inf."""
            arrays = []
            for label, source in sources.items():
                arrays.append(source.read(name, layer, layout))
                _check_finite(arrays[-1], label, name, layer)
            return arrays

        def merge_slice(name: str, layer: int | None, arrays: list[np.ndarray] | None = None) -> np.ndarray:
            arrays = read(name, layer) if arrays is None else arrays
            rng = None
            if spec_method.random:
                rng = np.random.default_rng([seed, zlib.crc32(name.encode()), 0 if layer is None else layer + 1])
            p = spec.resolve(name, layer, num_layers)
            merged = spec_method.fn(arrays[: len(models)], arrays[len(models)] if base else None, p, rng)
            return merged.astype(tensors[name].dtype, copy=False)

        def slice_cost(name: str) -> int:
            info = tensors[name]
            elements = int(np.prod(info.shape[1:] if info.stacked else info.shape))
            return elements * 4 * (2 * len(sources) + 4)  # inputs, float32 task vectors and temporaries

        budget = _Budget(memory_budget_bytes)
        writers = []
        try:
            hf_writer = None
            if hf_output:
                hf_dir = cleanup.enter_context(io.atomic_output(hf_output, overwrite))
                cfg, hf_cfg = io.hf_config_for(list(sources.values()), model_config, model_type)
                hf_writer = io.HFWriter(hf_dir, cfg, hf_cfg, tensors, max_shard_bytes)
                writers.append(hf_writer)
                skipped = [n for n in tensors if not hf_writer.covers(n)]
                if skipped:
                    logger.warning("HF checkpoints have no place for %s; they are left out of %s", skipped, hf_output)
            if output:
                orbax_dir = cleanup.enter_context(io.atomic_output(output, overwrite))
                _merge_to_orbax(orbax_dir, tensors, read, merge_slice, slice_cost, len(sources), budget, hf_writer)
            else:
                units = [(n, i) for n, t in tensors.items() if hf_writer.covers(n)
                         for i in (range(t.shape[0]) if t.stacked else [None])]
                _merge_to_hf(units, merge_slice, slice_cost, budget, hf_writer, layout, workers)
        finally:
            for writer in writers:
                writer.close()
        # Leaving the ExitStack renames the finished outputs into place (or deletes them on an error).
    input_bytes = sum(int(np.prod(t.shape)) * t.dtype.itemsize for t in tensors.values()) * len(sources)
    wall = time.perf_counter() - start
    summary = dict(method=method, models=list(models), base=base, output=output, hf_output=hf_output,
                   tensors=len(tensors), input_bytes=input_bytes, wall_s=round(wall, 3),
                   read_gb_per_s=round(input_bytes / wall / 1e9, 3))
    logger.info("merge: %s", summary)
    return summary


def _merge_to_hf(units, merge_slice, slice_cost, budget, writer, layout, workers) -> None:
    """Merge and write every (name, layer) unit in a thread pool; the first error cancels the rest."""
    def one(unit):
        name, layer = unit
        with budget.hold(slice_cost(name)):
            writer.write(name, layer, merge_slice(name, layer), layout)

    with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        futures = [pool.submit(one, u) for u in units]
        try:
            for f in concurrent.futures.as_completed(futures):
                f.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _merge_to_orbax(directory, tensors, read, merge_slice, slice_cost, num_sources, budget, hf_writer) -> None:
    """Orbax pulls each whole (stacked) tensor when it writes it, merged one layer slice at a time.

    Inputs are read whole: Orbax stores each array as one compressed chunk, so reading a layer slice
    would decompress the whole array once per layer. An error inside Orbax's background writes would
    leave its other writes running after the temporary output is deleted, so a failed merge instead
    lets the save finish with zeros and raises afterwards.
    """
    failures: list[BaseException] = []

    def cost(name: str) -> int:
        info = tensors[name]
        whole = int(np.prod(info.shape)) * info.dtype.itemsize
        return whole * (num_sources + 1) + slice_cost(name)  # inputs, output, one slice's work

    def compute(name: str):
        def run() -> np.ndarray:  # the budget is held from here until Orbax has written the result
            info = tensors[name]
            budget.acquire(cost(name))
            if failures:
                return np.zeros(info.shape, info.dtype)
            try:
                if not info.stacked:
                    merged = merge_slice(name, None)
                else:
                    inputs = read(name, None)
                    merged = np.empty(info.shape, info.dtype)
                    for layer in range(info.shape[0]):
                        merged[layer] = merge_slice(name, layer, [x[layer] for x in inputs])
                    del inputs
                if hf_writer is not None and hf_writer.covers(name):
                    for layer in (range(info.shape[0]) if info.stacked else [None]):
                        hf_writer.write(name, layer, merged if layer is None else merged[layer])
                return merged
            except BaseException as e:  # noqa: B036 (KeyboardInterrupt too: re-raised below)
                failures.append(e)
                return np.zeros(info.shape, info.dtype)
        return run

    tree: dict[str, Any] = {}
    for name, info in tensors.items():
        node = tree
        *parents, leaf = name.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = io.Lazy(info.shape, info.dtype, compute(name), functools.partial(budget.release, cost(name)))
    io.write_orbax(directory, tree)
    if failures:
        raise failures[0]
