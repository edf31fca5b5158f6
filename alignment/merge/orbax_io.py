"""Orbax checkpoints as merge sources and outputs (the `alignment.checkpoint` layout).

`OrbaxSource` opens each params array with tensorstore and slices it, so a layer is read without the
rest. `write_orbax` drives an Orbax save whose leaves are computed on demand and written block by block
(`Lazy`), so the params tree is never in memory at once.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import os
from typing import Any, Callable, Generator

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from alignment.merge.tensor_info import TensorInfo

STATE, PARAMS = "state", "params"  # the layout of alignment.checkpoint: <root>/<step>/state holds {'params': ...}


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
        # A thread of the leaf's own: a generator may wait (for the merge's memory budget) until another leaf is
        # written, and in asyncio's shared pool the waiters could take every thread that leaf needs (a deadlock).
        thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lazy_leaf")
        loop = asyncio.get_running_loop()
        try:
            while (piece := await loop.run_in_executor(thread, next, blocks, None)) is not None:
                start, block = piece
                await (array if start is None else array[start:start + block.shape[0]]).write(block)
        finally:
            await loop.run_in_executor(thread, blocks.close)
            thread.shutdown(wait=False)

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
