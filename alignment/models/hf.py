"""Hugging Face safetensors import and export for Llama and Qwen2 causal-LM checkpoints.

Safetensors files are read and written by this module directly (an 8-byte little-endian header
length, a JSON header, then the raw tensor bytes): reading through `mmap` is lazy, needs neither
torch nor flax, and handles BF16 through `ml_dtypes.bfloat16`, which `safe_open(framework="numpy")`
cannot (imported only for a BF16 tensor: its import alone takes about a second). HF Linear weights are
stored [out, in]; the project keeps [in..., out...] with heads split out, and stacks per-layer tensors on a
leading [num_layers] axis.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import mmap
import os
import shutil
import struct
import tempfile
from typing import Any, Iterator

import numpy as np

from alignment.models.config import ModelConfig, from_hf_config, to_hf_config

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # safetensors -> numpy name
ST_NAMES = {numpy_name: name for name, numpy_name in ST_DTYPES.items()}
# Buffers some exporters save next to the weights; they are recomputed from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def numpy_dtype(name: Any) -> np.dtype:
    """np.dtype of a dtype or its name, bfloat16 included."""
    if str(name) == "bfloat16":
        import ml_dtypes  # ~1 s to import: float32 checkpoints (most merges) never pay it

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One HF tensor: its HF layout `hf_shape` and project layout `shape` (one layer, no stacking axis)."""

    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]
    transpose: bool  # an HF Linear weight, stored [out, in]

    def to_project(self, w: np.ndarray) -> np.ndarray:
        return (w.T if self.transpose else w).reshape(self.shape)

    def to_hf(self, p: np.ndarray) -> np.ndarray:
        if self.transpose:
            return p.reshape(self.hf_shape[::-1]).T
        return p.reshape(self.hf_shape)


def _linear(inputs: tuple[int, ...], outputs: tuple[int, ...]) -> _Tensor:
    """HF [prod(outputs), prod(inputs)] <-> project [*inputs, *outputs]."""
    return _Tensor((math.prod(outputs), math.prod(inputs)), (*inputs, *outputs), transpose=True)


def _vector(shape: tuple[int, ...]) -> _Tensor:
    """HF [prod(shape)] <-> project `shape` (norm scales and biases)."""
    return _Tensor((math.prod(shape),), shape, transpose=False)


def conversion_layout(c: ModelConfig) -> tuple[dict[str, tuple[str, _Tensor]], dict[str, tuple[str, _Tensor]]]:
    """(top-level, per-layer) maps from project parameter name to (HF name, conversion).

    Per-layer HF names contain `{i}`, the layer index.
    """
    d, h, kv, dh, f, v = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, c.vocab_size
    top = {
        "embed": ("model.embed_tokens.weight", _Tensor((v, d), (v, d), transpose=False)),
        "final_norm": ("model.norm.weight", _vector((d,))),
    }
    if not c.tie_embeddings:
        top["lm_head"] = ("lm_head.weight", _linear((d,), (v,)))
    prefix = "model.layers.{i}."
    layer = {
        "attn_norm": (prefix + "input_layernorm.weight", _vector((d,))),
        "q_proj": (prefix + "self_attn.q_proj.weight", _linear((d,), (h, dh))),
        "k_proj": (prefix + "self_attn.k_proj.weight", _linear((d,), (kv, dh))),
        "v_proj": (prefix + "self_attn.v_proj.weight", _linear((d,), (kv, dh))),
        "o_proj": (prefix + "self_attn.o_proj.weight", _linear((h, dh), (d,))),
        "mlp_norm": (prefix + "post_attention_layernorm.weight", _vector((d,))),
        "gate_proj": (prefix + "mlp.gate_proj.weight", _linear((d,), (f,))),
        "up_proj": (prefix + "mlp.up_proj.weight", _linear((d,), (f,))),
        "down_proj": (prefix + "mlp.down_proj.weight", _linear((f,), (d,))),
    }
    if c.qkv_bias:
        layer.update(
            q_bias=(prefix + "self_attn.q_proj.bias", _vector((h, dh))),
            k_bias=(prefix + "self_attn.k_proj.bias", _vector((kv, dh))),
            v_bias=(prefix + "self_attn.v_proj.bias", _vector((kv, dh))),
        )
    return top, layer


def hf_entries(c: ModelConfig) -> Iterator[tuple[str, str, int | None, _Tensor]]:
    """(HF name, project name, layer index or None, conversion) for every tensor, in checkpoint order."""
    top, layer = conversion_layout(c)
    yield top["embed"][0], "embed", None, top["embed"][1]
    for i in range(c.num_layers):
        for key, (name, t) in layer.items():
            yield name.format(i=i), key, i, t
    for key, (name, t) in top.items():
        if key != "embed":
            yield name, key, None, t


def _expected_hf_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the config requires -> its HF shape."""
    return {name: t.hf_shape for name, _, _, t in hf_entries(c)}


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class _Entry:
    """Where one tensor lives: `file`, byte range [begin, end) after the header, dtype and shape."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _read_header(file: str) -> tuple[dict[str, _Entry], int]:
    """(name -> entry, byte offset of the data section) from one .safetensors file."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: not a safetensors file ({e})") from None
    header.pop("__metadata__", None)
    entries = {}
    for name, info in header.items():
        if info["dtype"] not in ST_DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has dtype {info['dtype']}; supported: {sorted(ST_DTYPES)}")
        begin, end = info["data_offsets"]
        entry = _Entry(file, info["dtype"], tuple(info["shape"]), begin, end)
        if end - begin != math.prod(entry.shape) * numpy_dtype(ST_DTYPES[entry.dtype]).itemsize:
            raise ValueError(f"{file}: tensor {name!r} byte range does not match its shape {entry.shape}")
        entries[name] = entry
    return entries, 8 + length


class _LazyReader:
    """Memory-maps each file once; `get(name)` is a read-only numpy view of that tensor's bytes."""

    def __init__(self, entries: dict[str, _Entry], data_offsets: dict[str, int]):
        self.entries = entries
        self.data_offsets = data_offsets
        self._maps: dict[str, mmap.mmap] = {}

    def get(self, name: str) -> np.ndarray:
        e = self.entries[name]
        if e.file not in self._maps:
            with open(e.file, "rb") as f:
                self._maps[e.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        dtype = numpy_dtype(ST_DTYPES[e.dtype])
        offset = self.data_offsets[e.file] + e.begin
        return np.frombuffer(self._maps[e.file], dtype, math.prod(e.shape), offset).reshape(e.shape)


def index_checkpoint(path: str) -> _LazyReader:
    """A reader over a single .safetensors file, or a directory's single file or sharded index."""
    if os.path.isfile(path):
        files, weight_map = [path], None
    elif os.path.isfile(os.path.join(path, INDEX_FILE)):
        with open(os.path.join(path, INDEX_FILE)) as f:
            weight_map = json.load(f)["weight_map"]
        files = [os.path.join(path, shard) for shard in dict.fromkeys(weight_map.values())]
    elif os.path.isfile(os.path.join(path, SINGLE_FILE)):
        files, weight_map = [os.path.join(path, SINGLE_FILE)], None
    else:
        raise FileNotFoundError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    entries, data_offsets = {}, {}
    for file in files:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"checkpoint shard not found: {file}")
        file_entries, data_offsets[file] = _read_header(file)
        entries.update(file_entries)
    if weight_map is not None:
        misplaced = [n for n, shard in weight_map.items()
                     if n not in entries or entries[n].file != os.path.join(path, shard)]
        if misplaced:
            raise ValueError(f"{path}: {INDEX_FILE} lists tensors not found in their shard: {misplaced}")
    return _LazyReader(entries, data_offsets)


def validate_tensors(path: str, c: ModelConfig, entries: dict[str, _Entry]) -> None:
    """Raise one ValueError naming every missing, unexpected or wrongly shaped tensor."""
    expected = _expected_hf_shapes(c)
    if c.tie_embeddings and "lm_head.weight" in entries:
        expected["lm_head.weight"] = (c.vocab_size, c.hidden_size)  # a tied model may still store it
    problems = []
    for name, shape in expected.items():
        if name not in entries:
            problems.append(f"missing {name} (expected shape {list(shape)})")
        elif entries[name].shape != shape:
            problems.append(f"{name}: expected shape {list(shape)}, found {list(entries[name].shape)}")
    for name, entry in entries.items():
        if name not in expected and not name.endswith(_IGNORED_SUFFIXES):
            problems.append(f"unexpected {name} (found shape {list(entry.shape)})")
    if problems:
        raise ValueError(f"{path}: checkpoint does not match the model config:\n  " + "\n  ".join(problems))


def load_hf_checkpoint(path: str | os.PathLike, config: ModelConfig | None = None,
                       dtype: str | None = None) -> tuple[ModelConfig, dict[str, Any]]:
    """Load an HF Llama/Qwen2 safetensors checkpoint as (config, params) with numpy leaves.

    `path`: a directory with `config.json` and `model.safetensors` or `model.safetensors.index.json`
    plus shards, or (with `config`) a single `.safetensors` file. The params are cast to `dtype`, else
    to `config.param_dtype` (float32 when the config is read from `config.json`); the returned config's
    `param_dtype` always matches them. With `config.value_head` the value head starts at zero, since HF
    causal-LM checkpoints have none.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"HF checkpoint not found: {path}")
    if config is None:
        if not os.path.isdir(path):
            raise ValueError(f"{path}: loading a single .safetensors file needs an explicit `config`")
        config = from_hf_config(path)
    if dtype is not None:
        config = dataclasses.replace(config, param_dtype=str(numpy_dtype(dtype)))
    reader = index_checkpoint(path)
    validate_tensors(path, config, reader.entries)
    return config, _to_project(config, reader)


def _to_project(c: ModelConfig, reader: _LazyReader) -> dict[str, Any]:
    """The project parameter tree (see `Transformer`) from validated HF tensors."""
    dtype = numpy_dtype(c.param_dtype)
    top, layer = conversion_layout(c)
    params: dict[str, Any] = {key: t.to_project(reader.get(name)).astype(dtype) for key, (name, t) in top.items()}
    params["layers"] = {
        key: np.stack([t.to_project(reader.get(name.format(i=i))).astype(dtype) for i in range(c.num_layers)])
        for key, (name, t) in layer.items()
    }
    if c.value_head:
        params["value_kernel"] = np.zeros((c.hidden_size,), dtype)
        params["value_bias"] = np.zeros((), dtype)
    return params


# ----------------------------------------------------------------------------- writing


def _host_params(c: ModelConfig, params: Any) -> dict[str, Any]:
    """Params as numpy (from possibly sharded jax arrays), checked against the config's shapes."""
    import flax.linen as nn  # only here: reading safetensors (a merge) stays free of JAX's import time
    import jax

    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), nn.meta.unbox(params))
    if "value_kernel" in host or "value_bias" in host:
        logger.warning("HF causal-LM checkpoints have no value head: value_kernel/value_bias are not exported")
    top, layer = conversion_layout(c)
    wanted = {(key,): t.shape for key, (_, t) in top.items()}
    wanted.update({("layers", key): (c.num_layers, *t.shape) for key, (_, t) in layer.items()})
    problems = []
    for keys, shape in wanted.items():
        node = host
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        if node is None:
            problems.append(f"missing {'/'.join(keys)} (expected shape {list(shape)})")
        elif node.shape != shape:
            problems.append(f"{'/'.join(keys)}: expected shape {list(shape)}, found {list(node.shape)}")
    if problems:
        raise ValueError("params do not match the model config:\n  " + "\n  ".join(problems))
    return host


def _hf_tensors(c: ModelConfig, host: dict[str, Any]) -> dict[str, np.ndarray]:
    """HF name -> HF-layout array (views of `host`, no copies), in checkpoint order."""
    return {name: t.to_hf(host[key] if i is None else host["layers"][key][i])
            for name, key, i, t in hf_entries(c)}


def plan_shards(sizes: dict[str, int], max_shard_bytes: int | None) -> list[list[str]]:
    """Consecutive groups of tensor names, each at most `max_shard_bytes` unless one tensor is larger."""
    if max_shard_bytes is None or sum(sizes.values()) <= max_shard_bytes:
        return [list(sizes)]
    shards, current, current_bytes = [], [], 0
    for name, size in sizes.items():
        if current and current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += size
    return shards + [current]


def _write_safetensors(file: str, tensors: dict[str, np.ndarray], dtypes: dict[str, np.dtype]) -> None:
    """Write `tensors`, each cast to its entry in `dtypes`, as one .safetensors file."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}  # transformers refuses files without it
    offset = 0
    for name, array in tensors.items():
        size = array.size * dtypes[name].itemsize
        header[name] = {"dtype": ST_NAMES[dtypes[name].name], "shape": list(array.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, array in tensors.items():
            f.write(np.ascontiguousarray(array, dtype=dtypes[name]).reshape(-1).view(np.uint8).data)


def save_hf_checkpoint(path: str | os.PathLike, config: ModelConfig, params: Any, model_type: str = "llama",
                       max_shard_bytes: int | None = None, dtype: str | None = None,
                       overwrite: bool = False) -> None:
    """Write `params` as an HF `model_type` ('llama' or 'qwen2') checkpoint directory at `path`.

    Writes `config.json` and `model.safetensors`, or `model-0000k-of-0000N.safetensors` shards plus
    `model.safetensors.index.json` when the total exceeds `max_shard_bytes`. Tensors keep their param
    dtype (bf16 as BF16) unless `dtype` is given. A value head is dropped with a warning. Everything is
    written to a temporary directory beside `path` and renamed into place, so a crash leaves no partial
    output; an existing `path` is an error unless `overwrite`, which replaces it only once the new
    checkpoint is complete.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    hf_config = to_hf_config(config, model_type)
    host = _host_params(config, params)
    tensors = _hf_tensors(config, host)
    dtypes = {name: numpy_dtype(dtype) if dtype is not None else a.dtype for name, a in tensors.items()}
    unsupported = sorted({str(d) for d in dtypes.values() if d.name not in ST_NAMES})
    if unsupported:
        raise ValueError(f"cannot export dtypes {unsupported}; supported: float64, float32, float16, bfloat16")
    stored = {str(d) for d in dtypes.values()}
    hf_config["torch_dtype"] = stored.pop() if len(stored) == 1 else config.param_dtype
    sizes = {name: a.size * dtypes[name].itemsize for name, a in tensors.items()}
    shards = plan_shards(sizes, max_shard_bytes)

    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        for file, names in shard_files(shards):
            _write_safetensors(os.path.join(tmp, file), {n: tensors[n] for n in names}, dtypes)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())},
                     "weight_map": {n: file for file, names in shard_files(shards) for n in names}}
            with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                json.dump(index, f, indent=2)
        move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def shard_files(shards: list[list[str]]) -> Iterator[tuple[str, list[str]]]:
    """(file name, tensor names) per shard, with HF's `model-00001-of-00003.safetensors` naming."""
    if len(shards) == 1:
        yield SINGLE_FILE, shards[0]
        return
    for k, names in enumerate(shards, start=1):
        yield f"model-{k:05d}-of-{len(shards):05d}.safetensors", names


def move_into_place(tmp: str, path: str) -> None:
    """Rename the finished `tmp` directory to `path`, replacing an existing `path` only after that."""
    if not os.path.exists(path):
        os.rename(tmp, path)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=os.path.dirname(path))
    os.rename(path, os.path.join(old, "previous"))
    os.rename(tmp, path)
    shutil.rmtree(old)
