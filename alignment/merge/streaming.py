"""Merge checkpoints tensor by tensor: read one layer slice of every model, merge it, write it, drop it.

Peak memory is a few tensors per worker, never the model: each unit of work holds its estimated bytes
in a shared budget, so workers run in parallel only while their tensors fit (a unit larger than the
budget runs alone). Each unit is merged by the compiled loops of `methods.merge_pieces`, which release
the GIL; an HF -> HF merge writes each piece of the result to its file as it comes, so a merged tensor is
never whole in memory. With several local devices a tensor of `shard_min_elements` or more is merged sharded over
them (`sharded.merge_tensor_sharded`). Stacked [num_layers, ...] parameters are merged layer by layer,
so per-tensor statistics (TIES' threshold, angles, norms) are per layer.
Everything is checked before the first byte is written: method, base, parameters, output paths, and
that every checkpoint has the same tensor names, shapes and dtypes. NaN or Inf in an input aborts the
merge, naming the checkpoint and tensor (the combine screens every element on its way); outputs appear
only when complete, from a hidden working directory beside them that a merge killed outright leaves and
the next merge into the same place removes (`checkpoint_io.atomic_output`).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import threading
import time
import zlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from alignment.data import tokenizer_files
from alignment.merge import checkpoint_io
from alignment.merge.methods import METHODS, NonFiniteInput, merge_pieces
from alignment.merge.params import make_spec
from alignment.models import hf
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

    def acquire_first_fitting(self, pending: list, cost: Callable[[Any], int]) -> Any:
        """Remove from `pending` its first unit that fits in what is left (waiting until one does) and hold its
        cost; None once `pending` is empty."""
        with self._cond:
            while pending:
                for k, unit in enumerate(pending):
                    if self.used == 0 or self.used + cost(unit) <= self.limit:
                        self.used += cost(unit)
                        return pending.pop(k)
                self._cond.wait()
            return None

    def drop(self, pending: list) -> None:
        """Empty `pending`: threads finish the unit they hold and take no other."""
        with self._cond:
            pending.clear()
            self._cond.notify_all()


def _run_in_budget(units: Sequence, cost: Callable[[Any], int], work: Callable[[Any], None], budget: _Budget,
                   workers: int) -> None:
    """work(unit) for every unit on `workers` threads, largest first. A free thread takes the largest waiting unit
    that fits in what the running ones leave of the budget, so a large unit waiting for room does not idle the
    other threads. The first error stops the rest and is raised."""
    pending = sorted(units, key=cost, reverse=True)

    def worker():
        while (unit := budget.acquire_first_fitting(pending, cost)) is not None:
            try:
                work(unit)
            except BaseException:
                budget.drop(pending)
                raise
            finally:
                budget.release(cost(unit))

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(worker) for _ in range(workers)]
        try:
            for f in futures:
                f.result()
        except BaseException:
            budget.drop(pending)
            raise


def merge_checkpoints(models: Sequence[str], method: str, base: str = "", output: str = "", hf_output: str = "",
                      params: Mapping[str, Any] | None = None, overrides: Sequence = (), seed: int = 0,
                      overwrite: bool = False, workers: int = 0, memory_budget_bytes: int = 1 << 30,
                      model_config: ModelConfig | None = None, model_type: str = "llama",
                      max_shard_bytes: int | None = None, shard_min_elements: int = 0, spec: Any = None,
                      out_dtype: str = "", tokenizer_from: str = "") -> dict[str, Any]:
    """Merge `models` (Orbax checkpoints or HF directories) with `method`; returns a summary dict.

    output: Orbax checkpoint directory (step 0, readable by `alignment.checkpoint.load_params`);
    hf_output: HF safetensors directory; at least one is required. An existing output is a
    `checkpoint_io.OutputExists` error unless overwrite, which replaces it once the new one is complete
    (`checkpoint_io.atomic_output`). params/overrides: see `alignment.merge.params`; spec: instead of them, anything with their `resolve` and `unmatched_patterns`
    (`mergekit_yaml.MergekitParams`). seed: DARE masks depend on it, the tensor name and layer (not on order or
    workers). workers: threads for HF-only output, 0 = one per CPU (Orbax output runs in Orbax's threads,
    bounded by the same memory budget). model_config: names HF tensors when HF output is made
    from Orbax inputs only. shard_min_elements: tensors this large are merged sharded over the local
    devices when there are several (0 = never, the default; the merge stage sets it). out_dtype: 'float32',
    'float16' or 'bfloat16' for the written tensors ('' = the inputs' dtype). tokenizer_from: an HF directory
    whose tokenizer files are copied into hf_output. A merge of HF checkpoints into HF output with
    shard_min_elements 0 imports neither JAX nor Orbax.
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
        if out:
            checkpoint_io.prepare_output(out, overwrite)
    if out_dtype and out_dtype not in checkpoint_io.OUT_DTYPES:
        raise ValueError(f"out_dtype {out_dtype!r}: choose from {checkpoint_io.OUT_DTYPES}")
    if tokenizer_from and not hf_output:
        raise ValueError(f"tokenizer_from={tokenizer_from} is copied into hf_output, which is not set")
    if spec is None:
        spec = make_spec(method, len(models), dict(params or {}), overrides)
    elif params or overrides:
        raise ValueError("give the merge parameters either as params/overrides or as spec, not both")
    sharded = None
    if shard_min_elements > 0:
        from alignment.merge import sharded  # imports JAX (seconds): only when merging on devices is asked for

    labels = {f"model {i} ({p})": p for i, p in enumerate(models)}
    if base:
        labels[f"base ({base})"] = base
    sources = {label: checkpoint_io.open_source(path) for label, path in labels.items()}
    with contextlib.ExitStack() as cleanup:
        for source in sources.values():
            cleanup.callback(source.close)
        tensors = checkpoint_io.check_same_tensors(sources)
        unmatched = spec.unmatched_patterns(list(tensors))
        if unmatched:
            raise ValueError(f"override patterns (of a mergekit YAML: filters, on HF tensor names) match no tensor: "
                             f"{unmatched}; tensors: {sorted(tensors)}")
        num_layers = next((t.shape[0] for t in tensors.values() if t.stacked), 1)
        units = [(n, i) for n, t in tensors.items() for i in (range(t.shape[0]) if t.stacked else [None])]
        resolved = {(n, i): spec.resolve(n, i, num_layers) for n, i in units}  # a bad parameter fails here
        written = tensors if not out_dtype else {
            n: dataclasses.replace(t, dtype=hf.numpy_dtype(out_dtype)) for n, t in tensors.items()}
        # HF -> HF merges stay in HF's layout; anything touching Orbax uses the project layout.
        layout = "hf" if not output and all(s.kind == "hf" for s in sources.values()) else "project"

        def read(name: str, layer: int | None) -> list[np.ndarray]:
            """That tensor (or layer slice) of every source, models first."""
            arrays = []
            for source in sources.values():
                arrays.append(source.read(name, layer, layout))
            return arrays

        def merged(name: str, layer: int | None, arrays: list[np.ndarray] | None = None,
                   out: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
            """That tensor (or layer slice) merged, as `merge_pieces` yields it: (first element, float32 values),
            in pieces of one reused buffer, or whole into `out` (flat float32) when given."""
            arrays = read(name, layer) if arrays is None else arrays
            # DARE's draws depend on the seed, the tensor and the layer only: not on order or workers.
            key = (seed, zlib.crc32(name.encode()), 0 if layer is None else layer + 1)
            p = resolved[(name, layer)]
            model_arrays, base_array = arrays[: len(models)], arrays[len(models)] if base else None
            try:
                if sharded is not None and sharded.use_mesh(arrays[0].shape, shard_min_elements):
                    result = sharded.merge_tensor_sharded(method, model_arrays, base_array, p, key).reshape(-1)
                    if out is not None:
                        out[:] = result
                    yield 0, result
                else:
                    yield from merge_pieces(method, model_arrays, base_array, p, key, out=out)
            except NonFiniteInput as e:
                where = name if layer is None else f"{name} (layer {layer})"
                # The index in the whole (stacked) tensor, as the user would look it up.
                first = ((layer,) if layer is not None else ()) + e.position
                raise ValueError(f"{list(sources)[e.index]}: tensor {where} contains NaN or Inf (first at index "
                                 f"{first}); nothing was written") from None

        def merge_slice(name: str, layer: int | None, arrays: list[np.ndarray] | None = None) -> np.ndarray:
            """That tensor (or layer slice) merged whole, in its checkpoint dtype."""
            arrays = read(name, layer) if arrays is None else arrays
            out = np.empty(arrays[0].shape, np.float32)
            for _ in merged(name, layer, arrays, out.reshape(-1)):
                pass
            return out.astype(written[name].dtype, copy=False)

        def slice_cost(name: str) -> int:
            """Bytes one slice's merge may hold: its inputs, their float32 copies if they are not float32, the result
            (whole where it is converted or goes to Orbax; an HF -> HF merge holds only a 1 MB piece of it)."""
            info = tensors[name]
            elements = int(np.prod(info.shape[1:] if info.stacked else info.shape))
            copies = 0 if info.dtype == np.float32 else 4 * len(sources)
            return elements * (info.dtype.itemsize * len(sources) + copies + 4)

        budget = _Budget(memory_budget_bytes)
        writers = []
        try:
            hf_writer = None
            if hf_output:
                hf_dir = cleanup.enter_context(checkpoint_io.atomic_output(hf_output, overwrite))
                cfg, hf_cfg = checkpoint_io.hf_config_for(list(sources.values()), model_config, model_type)
                hf_writer = checkpoint_io.HFWriter(hf_dir, cfg, hf_cfg, written, max_shard_bytes)
                writers.append(hf_writer)
                if tokenizer_from:
                    tokenizer_files.copy_tokenizer(tokenizer_from, hf_dir)
                skipped = [n for n in tensors if not hf_writer.covers(n)]
                if skipped:
                    logger.warning("HF checkpoints have no place for %s; they are left out of %s", skipped, hf_output)
            if output:
                orbax_dir = cleanup.enter_context(checkpoint_io.atomic_output(output, overwrite))
                _merge_to_orbax(orbax_dir, written, sources, merge_slice, slice_cost, budget, hf_writer)
            else:
                covered = [(n, i) for n, i in units if hf_writer.covers(n)]
                _merge_to_hf(covered, merged, merge_slice, slice_cost, budget, hf_writer, layout, workers)
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


def _merge_to_hf(units, merged, merge_slice, slice_cost, budget, writer, layout, workers) -> None:
    """Merge and write every (name, layer) unit on `workers` threads within the memory budget.

    In HF's own layout each piece of a merged tensor goes straight to its place in the file, from a
    buffer that stays in cache; otherwise (Orbax inputs) whole slices are converted to HF's layout.
    """
    def one(unit):
        name, layer = unit
        if layout == "hf":
            for first, values in merged(name, layer):
                writer.write_elements(name, layer, first, values)
        else:
            writer.write(name, layer, merge_slice(name, layer), layout)

    _run_in_budget(units, lambda unit: slice_cost(unit[0]), one, budget, workers or os.cpu_count() or 1)


def _merge_to_orbax(directory, tensors, sources, merge_slice, slice_cost, budget, hf_writer) -> None:
    """Orbax pulls each tensor as it writes it; a stacked one comes in blocks of layers, merged a layer at a time.

    sources: label -> source, models first. A block is as many layers as the largest stored chunk of
    any input holds (reading fewer would decompress that chunk once per read): one layer for HF
    inputs and for outputs of this function, all of them for a checkpoint stored one chunk per
    tensor. An error inside Orbax's background writes would leave its other writes running after the
    temporary output is deleted, so a failed merge instead feeds zeros, lets the save finish and
    raises afterwards.
    """
    failures: list[BaseException] = []

    def block_layers(name: str) -> int:
        return min(tensors[name].shape[0], max(s.layers_per_chunk(name) for s in sources.values()))

    def cost(name: str) -> int:
        info = tensors[name]
        if not info.stacked:
            return slice_cost(name)
        layer_bytes = int(np.prod(info.shape[1:])) * info.dtype.itemsize
        return block_layers(name) * layer_bytes * (len(sources) + 1) + slice_cost(name)  # inputs, output block

    def merged_layers(name: str, start: int, stop: int) -> np.ndarray:
        """Layers [start, stop) merged: [stop - start, ...] (also written to the HF output)."""
        inputs = {label: s.read_layers(name, start, stop) for label, s in sources.items()}
        block = np.empty((stop - start, *tensors[name].shape[1:]), tensors[name].dtype)
        for layer in range(start, stop):
            arrays = [x[layer - start] for x in inputs.values()]
            block[layer - start] = merge_slice(name, layer, arrays)
            if hf_writer is not None and hf_writer.covers(name):
                hf_writer.write(name, layer, block[layer - start])
        return block

    def merged_or_zeros(name: str, start: int | None, stop: int | None) -> np.ndarray:
        """The merged tensor (start None) or layers [start, stop); zeros once any merge has failed."""
        info = tensors[name]
        shape = info.shape if start is None else (stop - start, *info.shape[1:])
        if not failures:
            try:
                if start is not None:
                    return merged_layers(name, start, stop)
                merged = merge_slice(name, None)
                if hf_writer is not None and hf_writer.covers(name):
                    hf_writer.write(name, None, merged)
                return merged
            except BaseException as e:  # noqa: B036 (KeyboardInterrupt too: re-raised below)
                failures.append(e)
        return np.zeros(shape, info.dtype)  # Orbax refuses a save with a tensor left unwritten

    def blocks(name: str):
        def run():  # the budget is held from the first block until Orbax has written the last
            info = tensors[name]
            budget.acquire(cost(name))
            try:
                if not info.stacked:
                    yield None, merged_or_zeros(name, None, None)
                    return
                step = block_layers(name)
                for start in range(0, info.shape[0], step):
                    yield start, merged_or_zeros(name, start, min(start + step, info.shape[0]))
            finally:
                budget.release(cost(name))
        return run

    from alignment.merge import orbax_io  # imports JAX, Orbax and tensorstore (seconds): only for Orbax output

    tree: dict[str, Any] = {}
    for name, info in tensors.items():
        node = tree
        *parents, leaf = name.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = orbax_io.Lazy(info.shape, info.dtype, blocks(name), layered=info.stacked)
    orbax_io.write_orbax(directory, tree)
    if failures:
        raise failures[0]
