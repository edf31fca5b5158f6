"""Tensor-at-a-time reading and writing of HF safetensors checkpoints for merging; the common source interface.

Sources name tensors by project parameter path ('embed', 'layers/q_proj', ...) and describe them in the
project layout: stacked layer tensors are [num_layers, ...]. `read(name, layer, layout)` returns one
layer slice (or a whole top-level tensor) without reading anything else (`read_layers` reads a block
of layers, `layers_per_chunk` says how many share a stored chunk). Safetensors tensors are located by
the header reader of `alignment.models.hf` and mapped one tensor at a time (read-only views of the
page cache, unmapped once dropped). Layout 'hf' returns HF's own layout (Linear weights [out, in]), only
offered by HF sources, so HF -> HF merges never transpose. Orbax checkpoints are read and written by
`alignment.merge.orbax_io`, imported only when a merge touches one: an HF -> HF merge never imports JAX,
Orbax or tensorstore.

`HFWriter` lays out every file's header first and then `pwrite`s each tensor at its offset, so tensors
can arrive in any order from any thread. `atomic_output` makes an output appear at its path only when
complete, writing it in a hidden working directory beside it that the next merge into the same path
deletes if this one was killed.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import mmap
import os
import shutil
import socket
import struct
import tempfile
import time
from typing import Any, Iterator, Mapping

import numpy as np

from alignment.merge.tensor_info import TensorInfo
from alignment.models import hf
from alignment.models.config import ModelConfig, from_hf_config, to_hf_config

logger = logging.getLogger(__name__)


def _describe(info: TensorInfo) -> str:
    return f"{list(info.shape)} {np.dtype(info.dtype).name}"


# ----------------------------------------------------------------------------- sources


class HFSource:
    """A HF Llama/Qwen2 safetensors directory, read through the converter in `alignment.models.hf`."""

    kind = "hf"

    def __init__(self, path: str):
        self.path = path
        self.config = from_hf_config(path)
        with open(os.path.join(path, "config.json")) as f:
            self.hf_config = json.load(f)
        self._reader = hf.index_checkpoint(path)
        self._fds: dict[str, int] = {}
        hf.validate_tensors(path, self.config, self._reader.entries)
        top, layer = hf.conversion_layout(self.config)
        self._top = {key: conversion for key, conversion in top.items()}
        self._layer = {f"layers/{key}": conversion for key, conversion in layer.items()}
        self.tensors = {}
        for key, (hf_name, t) in self._top.items():
            self.tensors[key] = TensorInfo(t.shape, self._dtype(hf_name), stacked=False)
        for key, (hf_name, t) in self._layer.items():
            dtypes = {self._dtype(hf_name.format(i=i)) for i in range(self.config.num_layers)}
            if len(dtypes) > 1:
                raise ValueError(f"{path}: the layers of {hf_name} have different dtypes {sorted(map(str, dtypes))}")
            self.tensors[key] = TensorInfo((self.config.num_layers, *t.shape), dtypes.pop(), stacked=True)

    def _dtype(self, hf_name: str) -> np.dtype:
        return hf.numpy_dtype(hf.ST_DTYPES[self._reader.entries[hf_name].dtype])

    def hf_name(self, name: str, layer: int | None) -> str:
        return self._top[name][0] if layer is None else self._layer[name][0].format(i=layer)

    def read(self, name: str, layer: int | None, layout: str = "project") -> np.ndarray:
        if layer is None and name in self._layer:  # a whole stacked tensor
            return np.stack([self.read(name, i, layout) for i in range(self.config.num_layers)])
        raw = self._map(self.hf_name(name, layer))
        if layout == "hf":
            return raw
        conversion = self._top[name][1] if layer is None else self._layer[name][1]
        return np.ascontiguousarray(conversion.to_project(raw))

    def read_layers(self, name: str, start: int, stop: int) -> np.ndarray:
        """Layers [start, stop) of a stacked tensor in the project layout: [stop - start, ...]."""
        return np.stack([self.read(name, i) for i in range(start, stop)])

    def layers_per_chunk(self, name: str) -> int:
        return 1  # every layer is its own safetensors tensor

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def _map(self, hf_name: str) -> np.ndarray:
        """One tensor as a read-only view of its own mapping: no copy, and it leaves RSS when dropped.

        MAP_POPULATE maps the (cached) pages in one call instead of a fault per page.
        """
        entry = self._reader.entries[hf_name]
        if entry.file not in self._fds:
            self._fds[entry.file] = os.open(entry.file, os.O_RDONLY)
        dtype = hf.numpy_dtype(hf.ST_DTYPES[entry.dtype])
        size = int(np.prod(entry.shape)) * dtype.itemsize
        offset = self._reader.data_offsets[entry.file] + entry.begin
        page = offset - offset % mmap.ALLOCATIONGRANULARITY
        if offset + size > os.fstat(self._fds[entry.file]).st_size:
            raise ValueError(f"{entry.file}: file ends inside tensor {hf_name!r}")
        if size == 0:
            return np.empty(entry.shape, dtype)
        mapped = mmap.mmap(self._fds[entry.file], size + offset - page, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                           prot=mmap.PROT_READ, offset=page)
        return np.frombuffer(mapped, dtype, int(np.prod(entry.shape)), offset - page).reshape(entry.shape)


def open_source(path: str):
    """An HFSource for a directory with config.json, else an `orbax_io.OrbaxSource`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return HFSource(path)
    from alignment.merge import orbax_io  # imports JAX, Orbax and tensorstore (seconds): only when needed
    return orbax_io.OrbaxSource(path)


def check_same_tensors(sources: Mapping[str, Any]) -> dict[str, TensorInfo]:
    """The common tensor table; one ValueError naming every tensor whose name, shape or dtype differs."""
    (first_label, first), *rest = sources.items()
    problems = []
    for label, source in rest:
        for name in sorted(first.tensors.keys() | source.tensors.keys()):
            a, b = first.tensors.get(name), source.tensors.get(name)
            if b is None:
                problems.append(f"  {name}: {first_label} has {_describe(a)}, missing from {label}")
            elif a is None:
                problems.append(f"  {name}: {label} has {_describe(b)}, missing from {first_label}")
            elif a.shape != b.shape or a.dtype != b.dtype:
                problems.append(f"  {name}: {first_label} has {_describe(a)}, {label} has {_describe(b)}")
    if problems:
        raise ValueError(f"the checkpoints to merge differ in {len(problems)} tensor(s); nothing was written:\n"
                         + "\n".join(problems))
    return dict(first.tensors)


# ----------------------------------------------------------------------------- atomic output


class OutputExists(ValueError):
    """The output path exists and overwriting it was not asked for."""

    def __init__(self, path: str):
        super().__init__(f"output {path} exists: pass overwrite=True (--config.merge.overwrite=True, or --overwrite "
                         "for python -m alignment.merge) to replace it once the new one is complete")


WORK_INFIX = ".merge-tmp-"  # a merge into DIR/out works in DIR/.out.merge-tmp-XXXXXXXX/
_LOCK = "lock"  # in a working directory: flock'ed by its merge while that runs; says who made it
_OLD_INFIX = ".tmp-"  # the working directories of earlier versions, which had no lock


def _owner() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"


def _size_mb(directory: str) -> float:
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total / 1e6


def remove_stale_work(path: str) -> list[str]:
    """Delete the working directories that merges into `path` left when they were killed; returns them.

    A working directory is stale when nobody holds its lock (the kernel drops a killed process's lock). A merge
    killed between moving an existing output aside and moving its new one into place left the old output in
    its working directory: that is moved back first. Working directories of live merges are left alone, and
    so (with a warning) are those of earlier versions, which had no lock to tell.
    """
    parent, name = os.path.split(os.path.abspath(path))
    removed = []
    for entry in sorted(os.listdir(parent)):
        work = os.path.join(parent, entry)
        if entry.startswith(f".{name}{_OLD_INFIX}"):
            logger.warning("%s (%.1f MB) looks like the working directory of a merge by an earlier version of this "
                           "project; delete it unless such a merge is running", work, _size_mb(work))
        if not entry.startswith(f".{name}{WORK_INFIX}"):
            continue
        try:
            lock = open(os.path.join(work, _LOCK))
        except FileNotFoundError:  # just removed by its merge, or by another cleaner
            continue
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a running merge
            owner = lock.read().strip() or "unknown"
            previous = os.path.join(work, "previous")
            if os.path.isdir(previous) and not os.path.lexists(path):
                os.rename(previous, path)
                logger.warning("restored %s from %s, where a killed merge (%s) had moved it", path, work, owner)
            size = _size_mb(work)
            shutil.rmtree(work, ignore_errors=True)
        logger.warning("removed %s (%.1f MB): the working directory of a merge into %s that was killed (%s)",
                       work, size, path, owner)
        removed.append(work)
    return removed


def prepare_output(path: str, overwrite: bool) -> None:
    """Remove what killed merges into `path` left (`remove_stale_work`, which may restore a previous output), then
    raise OutputExists if `path` exists and not overwrite."""
    if os.path.isdir(os.path.dirname(os.path.abspath(path))):
        remove_stale_work(path)
    if os.path.lexists(path) and not overwrite:
        raise OutputExists(os.path.abspath(path))


@contextlib.contextmanager
def atomic_output(path: str, overwrite: bool) -> Iterator[str]:
    """Yield an empty directory to write `path`'s contents into; it becomes `path` only when complete.

    It lives in a working directory beside `path`, `.<name>.merge-tmp-XXXXXXXX/` (the same filesystem, so
    the final renames are atomic), with a lock file this merge holds while it runs. An existing `path` (with
    overwrite) is moved into the working directory, the new output into place, and the working directory
    deleted, on success and on any error. Working directories of merges into `path` that were killed are
    deleted first (`prepare_output`).
    """
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    prepare_output(path, overwrite)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}{WORK_INFIX}", dir=os.path.dirname(path))
    # Locked before it has its name, so a cleaner never finds the lock unheld while this merge runs.
    unnamed = os.path.join(work, f"{_LOCK}.new")
    lock = open(unnamed, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write(_owner() + "\n")
        lock.flush()
        os.rename(unnamed, os.path.join(work, _LOCK))
        output = os.path.join(work, "output")
        os.mkdir(output)
        yield output
        if os.path.lexists(path):
            previous = os.path.join(work, "previous")
            os.rename(path, previous)
            try:
                os.rename(output, path)
            except BaseException:
                os.rename(previous, path)
                raise
        else:
            os.rename(output, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        lock.close()


# ----------------------------------------------------------------------------- HF writer


OUT_DTYPES = ("float32", "float16", "bfloat16")  # what HF output may be written as
class HFWriter:
    """Streams tensors into HF safetensors files under `directory` (header first, then pwrite per tensor).

    Files, names and order follow `save_hf_checkpoint` (`max_shard_bytes` splits into shards); dtypes
    are the inputs'. config.json is the given `hf_config` with its torch_dtype updated.
    """

    def __init__(self, directory: str, config: ModelConfig, hf_config: dict, tensors: Mapping[str, TensorInfo],
                 max_shard_bytes: int | None = None):
        self._conversions: dict[tuple[str, int | None], tuple[str, Any]] = {}
        for hf_name, key, i, t in hf.hf_entries(config):
            name = key if i is None else f"layers/{key}"
            self._conversions[(name, i)] = (hf_name, t)
        dtypes = {hf_name: tensors[name].dtype for (name, _), (hf_name, _) in self._conversions.items()}
        shapes = {hf_name: t.hf_shape for hf_name, t in self._conversions.values()}
        sizes = {n: int(np.prod(shapes[n])) * dtypes[n].itemsize for n in shapes}
        shards = hf.plan_shards(sizes, max_shard_bytes)
        self._where: dict[str, tuple[int, int, np.dtype]] = {}  # hf name -> (fd, absolute offset, dtype)
        self._fds = []
        for file, names in hf.shard_files(shards):
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for n in names:
                header[n] = {"dtype": hf.ST_NAMES[dtypes[n].name], "shape": list(shapes[n]),
                             "data_offsets": [offset, offset + sizes[n]]}
                offset += sizes[n]
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            fd = os.open(os.path.join(directory, file), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, struct.pack("<Q", len(raw)) + raw)
            # Reserved up front: the filesystem allocates the extents once, instead of page by page as the
            # pwrites land (1 GB of output: 0.35-2 s -> 0.25 s on ext4).
            os.posix_fallocate(fd, 0, 8 + len(raw) + offset)
            self._fds.append(fd)
            for n in names:
                self._where[n] = (fd, 8 + len(raw) + header[n]["data_offsets"][0], dtypes[n])
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())},
                     "weight_map": {n: file for file, names in hf.shard_files(shards) for n in names}}
            with open(os.path.join(directory, hf.INDEX_FILE), "w") as f:
                json.dump(index, f, indent=2)
        hf_config = dict(hf_config)
        hf_config["torch_dtype"] = str(next(iter(dtypes.values())))
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)

    def covers(self, name: str) -> bool:
        return (name, None) in self._conversions or (name, 0) in self._conversions

    def write(self, name: str, layer: int | None, array: np.ndarray, layout: str = "project") -> None:
        """Write one tensor (a layer slice of a stacked one) given in `layout`; safe from any thread."""
        _, t = self._conversions[(name, layer)]
        self.write_elements(name, layer, 0, (array if layout == "hf" else t.to_hf(array)).reshape(-1))

    def write_elements(self, name: str, layer: int | None, first: int, values: np.ndarray) -> None:
        """Write elements [first, first + values.size) of one tensor (a layer slice of a stacked one) in HF's
        layout and C order, converted to the file's dtype; safe from any thread."""
        hf_name, t = self._conversions[(name, layer)]
        fd, offset, dtype = self._where[hf_name]
        size = int(np.prod(t.hf_shape))
        if first < 0 or first + values.size > size:
            raise ValueError(f"{hf_name}: elements [{first}, {first + values.size}) are outside its {size}")
        data = np.ascontiguousarray(values, dtype=dtype)
        view, done = memoryview(data.reshape(-1).view(np.uint8)), 0
        offset += first * dtype.itemsize
        while done < len(view):  # pwrite may write less than asked for large buffers
            done += os.pwrite(fd, view[done:], offset + done)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def hf_config_for(sources: list, config: ModelConfig | None, model_type: str) -> tuple[ModelConfig, dict]:
    """(ModelConfig, config.json dict) for HF output: from the first HF input, else from `config`."""
    for source in sources:
        if source.kind == "hf":
            return source.config, source.hf_config
    if config is None:
        raise ValueError("HF output from Orbax inputs needs the model config (config.model) to name the tensors")
    return config, to_hf_config(config, model_type)
