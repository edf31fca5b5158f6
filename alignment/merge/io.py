"""Tensor-at-a-time reading and writing of Orbax and HF safetensors checkpoints for merging.

Sources name tensors by project parameter path ('embed', 'layers/q_proj', ...) and describe them in the
project layout: stacked layer tensors are [num_layers, ...]. `read(name, layer, layout)` returns one
layer slice (or a whole top-level tensor) without reading anything else: Orbax arrays are opened with
tensorstore and sliced (`read_layers` reads a block of layers, `layers_per_chunk` says how many
share a stored chunk), safetensors tensors are located by the header reader of `alignment.models.hf`
and mapped one tensor at a time (read-only views of the page cache, unmapped once dropped). Layout 'hf' returns HF's own layout (Linear weights [out, in]), only offered
by HF sources, so HF -> HF merges never transpose.

Writers: `HFWriter` lays out every file's header first and then `pwrite`s each tensor at its offset, so
tensors can arrive in any order from any thread. `write_orbax` drives an Orbax save whose leaves are
computed on demand and written block by block (`Lazy`), so the params tree is never in memory at
once. `atomic_output` makes either appear at its path only when complete.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import mmap
import os
import shutil
import struct
import tempfile
from typing import Any, Callable, Generator, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from alignment.models import hf
from alignment.models.config import ModelConfig, from_hf_config, to_hf_config

STATE, PARAMS = "state", "params"  # the layout of alignment.checkpoint: <root>/<step>/state holds {'params': ...}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]  # project layout; stacked tensors lead with [num_layers]
    dtype: np.dtype
    stacked: bool  # a 'layers/*' tensor, merged one layer slice at a time


def _describe(info: TensorInfo) -> str:
    return f"{list(info.shape)} {np.dtype(info.dtype).name}"


# ----------------------------------------------------------------------------- sources


class OrbaxSource:
    """The params of an `alignment.checkpoint` checkpoint (a step directory, or a root for its latest step)."""

    kind = "orbax"

    def __init__(self, path: str):
        self.path = path
        state = _orbax_state_dir(path)
        meta_file = os.path.join(state, "_METADATA")
        try:
            with open(meta_file) as f:
                meta = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable Orbax checkpoint ({meta_file}: {e})") from None
        driver = "zarr3" if meta.get("use_zarr3") else "zarr"
        self._arrays: dict[str, ts.TensorStore] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for entry in meta["tree_metadata"].values():
            keys = [k["key"] for k in entry["key_metadata"]]
            if keys[0] != PARAMS:
                continue  # step, optimizer state and rng are not merged
            name = "/".join(keys[1:])
            if meta.get("use_ocdbt"):
                kvstore = {"driver": "ocdbt", "base": f"file://{state}/", "path": ".".join(keys)}
            else:
                kvstore = {"driver": "file", "path": os.path.join(state, ".".join(keys))}
            array = ts.open({"driver": driver, "kvstore": kvstore}, open=True, read=True).result()
            self._arrays[name] = array
            self.tensors[name] = TensorInfo(tuple(array.shape), np.dtype(array.dtype.numpy_dtype),
                                            stacked=keys[1] == "layers")
        if not self.tensors:
            raise ValueError(f"{path}: the checkpoint has no params")

    def read(self, name: str, layer: int | None, layout: str = "project") -> np.ndarray:
        array = self._arrays[name] if layer is None else self._arrays[name][layer]
        return array.read().result()

    def read_layers(self, name: str, start: int, stop: int) -> np.ndarray:
        """Layers [start, stop) of a stacked tensor: [stop - start, ...]."""
        return self._arrays[name][start:stop].read().result()

    def layers_per_chunk(self, name: str) -> int:
        """Layers in one stored chunk: reading fewer would decompress that chunk once per read."""
        return int(self._arrays[name].chunk_layout.read_chunk.shape[0])

    def close(self) -> None:
        self._arrays = {}


def _orbax_state_dir(path: str) -> str:
    if os.path.isdir(os.path.join(path, STATE)):
        return os.path.join(path, STATE)
    steps = sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []
    if not steps:
        raise FileNotFoundError(f"{path}: no Orbax checkpoint (no <step>/state directory) and no HF config.json")
    return os.path.join(path, str(steps[-1]), STATE)


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
        return np.dtype(hf.ST_DTYPES[self._reader.entries[hf_name].dtype])

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
        dtype = np.dtype(hf.ST_DTYPES[entry.dtype])
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
    """An HFSource for a directory with config.json, else an OrbaxSource."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return HFSource(path) if os.path.isfile(os.path.join(path, "config.json")) else OrbaxSource(path)


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


@contextlib.contextmanager
def atomic_output(path: str, overwrite: bool) -> Iterator[str]:
    """Yield a temporary directory beside `path`; rename it to `path` on success, delete it on any error."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"output {path} exists; set overwrite to replace it")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
    try:
        yield tmp
        hf.move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- HF writer


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
                header[n] = {"dtype": hf.ST_NAMES[dtypes[n]], "shape": list(shapes[n]),
                             "data_offsets": [offset, offset + sizes[n]]}
                offset += sizes[n]
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            fd = os.open(os.path.join(directory, file), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, struct.pack("<Q", len(raw)) + raw)
            os.ftruncate(fd, 8 + len(raw) + offset)
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
        hf_name, t = self._conversions[(name, layer)]
        fd, offset, dtype = self._where[hf_name]
        data = array if layout == "hf" else t.to_hf(array)
        data = np.ascontiguousarray(data, dtype=dtype)
        view, done = memoryview(data.reshape(-1).view(np.uint8)), 0
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


# ----------------------------------------------------------------------------- Orbax writer


@dataclasses.dataclass
class Lazy:
    """An Orbax leaf produced only while Orbax writes it, in pieces.

    `blocks()` returns a generator of (first layer, array) pieces that tile the leaf along its leading
    axis, or of one (None, whole array); each piece is written before the next is asked for, and the
    generator is closed once the leaf is written or failed (its `finally` may free what it held).
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    blocks: Callable[[], Generator[tuple[int | None, np.ndarray], None, None]]
    layered: bool = False  # written in layer blocks: stored one layer per chunk

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize


class _LazyHandler(ocp.type_handlers.NumpyHandler):
    """Orbax's numpy handler (metadata, restore) with a save that writes each `Lazy` leaf block by block.

    The tensorstore spec is Orbax's own (`get_json_tspec_write`), so the on-disk format and metadata are
    exactly those of numpy leaves and `load_params` reads the result; memory is bounded by one block
    per leaf being written, not by the tree. Only public Orbax names are used: the numpy handler's
    write internals are private, so the save is re-implemented on the public spec builder.
    """

    def __init__(self):
        super().__init__(deepcopy_host_arrays=False)

    def typestr(self) -> str:
        return "np.ndarray"  # restored as numpy: the checkpoint must not depend on this class

    async def _write(self, value: Lazy, info, arg) -> None:
        await info.await_path_creation()
        tspec = ocp.type_handlers.get_json_tspec_write(
            info, use_ocdbt=info.is_ocdbt_checkpoint, global_shape=value.shape, local_shape=value.shape,
            dtype=np.dtype(value.dtype), process_index=jax.process_index() if info.is_ocdbt_checkpoint else None,
            arg=arg)
        array = await ts.open(ts.Spec(tspec), create=True, open=True, context=info.ts_context)
        blocks = value.blocks()
        try:
            while (piece := await asyncio.to_thread(next, blocks, None)) is not None:
                start, block = piece
                await (array if start is None else array[start:start + block.shape[0]]).write(block)
        finally:
            blocks.close()

    async def serialize(self, values, infos, args=None):
        args = args or [ocp.SaveArgs()] * len(values)

        async def write_all():
            await asyncio.gather(*(self._write(v, i, a) for v, i, a in zip(values, infos, args)))

        return [ocp.future.CommitFutureAwaitingContractedSignals(write_all(), name="lazy_merge")]


def write_orbax(directory: str, params: dict[str, Any]) -> None:
    """Save `params` (a tree of Lazy leaves) as step 0 of an `alignment.checkpoint` layout under `directory`.

    `layered` leaves are stored one layer per chunk (Orbax's `shard_axes=(0,)`), so every block write
    covers whole chunks and later per-layer reads decompress only their layer.
    """
    registry = ocp.type_handlers.create_type_handler_registry((Lazy, _LazyHandler()))
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry)
    save_args = jax.tree.map(lambda leaf: ocp.SaveArgs(shard_axes=(0,) if leaf.layered else ()), params,
                             is_leaf=lambda x: isinstance(x, Lazy))
    with ocp.CheckpointManager(directory, item_handlers={STATE: handler}) as manager:
        manager.save(0, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeSave({PARAMS: params},
                                                                              save_args={PARAMS: save_args})}))
        manager.wait_until_finished()
