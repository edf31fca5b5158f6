"""LoRA and QLoRA over the decoder's projection kernels, as pytree nodes the model's projections understand.

A LoRA adapter on a kernel W adds (x A) B * scale to x W: A [*in, rank] (Gaussian, std 1/rank as PEFT's
"gaussian" init), B [rank, *out] (zeros, so a fresh adapter leaves the model unchanged), scale = alpha / rank or,
with rsLoRA, alpha / sqrt(rank); dropout applies to the adapter's input only (as PEFT does). QLoRA stores the
frozen kernels quantised (`Quantized`: int8 per output channel, or 4-bit NormalFloat in blocks, two codes a byte)
and dequantises one layer's kernel at a time, inside the layer that uses it.

Parameters stay plain trees: `bind(frozen, trainable, spec)` puts a `LoraKernel` (base, A, B) at each adapted
kernel of the frozen tree, and `project` (what transformer.py calls for every projection) adds the adapter's term
or dequantises. The base is never copied or merged during training, its gradient is never formed (only A and B
are differentiated), and adapters-off is the frozen tree itself (the DPO / GRPO / PPO reference).

Why not qwix (Google's LoRA/QLoRA for Flax, used by Tunix): qwix finds the weight of an intercepted einsum among
the params of the Flax module that makes the call, and creates the adapter there with `module.param`. This model
declares its layer kernels once, stacked [layers, ...], in `StackedLayers`, and runs the projections as plain
functions inside `lax.scan` over per-layer slices; qwix finds no parameter behind those operands (so it adds no
adapter), and could not create parameters inside the scan. Using it would mean rewriting the decoder as one
Flax module per projection under `nn.scan`, which changes the checkpoint layout every stage shares.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterator

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from alignment.models import precision
from alignment.models.packed import Packed

# The adaptable kernels of a layer: name -> number of input (contracted) axes after the 'layers' axis. The einsum
# specs are transformer.py's: q/k/v "bsd,dhk->bshk", o "bshk,hkd->bsd", gate/up "bsd,df->bsf", down "bsf,fd->bsd".
PROJECTIONS = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1, "down_proj": 1}
QUANTIZERS = ("none", "int8", "nf4")
ALL_PROJECTIONS = r"layers/(q|k|v|o|gate|up|down)_proj"

# The 16 NormalFloat-4 levels (Dettmers et al. 2023, QLoRA, appendix E; bitsandbytes' table).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
# Rounding to the nearest level errs by at most half the widest gap between neighbouring levels, times absmax.
NF4_MAX_ERROR = float(np.max(np.diff(NF4_LEVELS)) / 2)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What `config.lora` asks for (hashable: it rides in the train state's static fields)."""

    targets: str = ALL_PROJECTIONS  # regex searched in each kernel's path, e.g. 'layers/q_proj'
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False  # scale alpha / sqrt(rank) (rank-stabilised LoRA) instead of alpha / rank
    quantize: str = "none"  # QLoRA: the frozen projection kernels stored as int8 or nf4
    block_size: int = 64  # nf4 block length (elements sharing one absmax)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @classmethod
    def from_config(cls, lora) -> "LoraSpec | None":
        """The spec of a `config.lora` block, or None when it is off."""
        if not lora.enabled:
            return None
        try:
            re.compile(lora.targets)
        except re.error as e:
            raise ValueError(f"config.lora.targets={lora.targets!r} is not a regular expression ({e})") from None
        if lora.quantize == "nf4" and lora.block_size % 2:
            raise ValueError(f"config.lora.block_size={lora.block_size} must be even (two 4-bit codes a byte)")
        return cls(targets=lora.targets, rank=int(lora.rank), alpha=float(lora.alpha), dropout=float(lora.dropout),
                   rslora=bool(lora.rslora), quantize=lora.quantize, block_size=int(lora.block_size))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Quantized(flax.struct.PyTreeNode):
    """A frozen kernel stored quantised; `dequantize()` gives it back in `dtype`.

    int8: codes int8 of the kernel's shape, scales [..., 1 per input axis, *out] = absmax over the input axes / 127.
    nf4: codes uint8 [..., blocks, block_size // 2] (two 4-bit level indices a byte, low nibble first) over the
    kernel flattened per leading 'layers' entry, absmax float32 [..., blocks]. Leading axes: the kernel's 'layers'.
    """

    codes: jax.Array
    scales: jax.Array
    kind: str = flax.struct.field(pytree_node=False)
    shape: tuple = flax.struct.field(pytree_node=False)  # the kernel's shape without the leading layers axis
    dtype: str = flax.struct.field(pytree_node=False)

    def dequantize(self, dtype=None) -> jax.Array:
        dtype = jnp.dtype(dtype or self.dtype)
        lead = self.codes.shape[: self.codes.ndim - (2 if self.kind == "nf4" else len(self.shape))]
        if self.kind == "int8":
            return (self.codes.astype(jnp.float32) * self.scales).astype(dtype)
        low, high = self.codes & 15, self.codes >> 4
        index = jnp.stack([low, high], axis=-1).reshape(*self.codes.shape[:-1], -1)  # [..., blocks, block]
        values = jnp.asarray(NF4_LEVELS)[index.astype(jnp.int32)] * self.scales[..., None]
        return values.reshape(*lead, -1)[..., : math.prod(self.shape)].reshape(*lead, *self.shape).astype(dtype)


def quantize(kernel: jax.Array, kind: str, input_axes: int, block_size: int = 64) -> Quantized:
    """kernel [layers, *in, *out] -> Quantized (`input_axes` = len(in))."""
    shape = tuple(kernel.shape[1:])
    w = kernel.astype(jnp.float32)
    if kind == "int8":
        axes = tuple(range(1, 1 + input_axes))
        scales = jnp.max(jnp.abs(w), axis=axes, keepdims=True) / 127.0
        scales = jnp.where(scales == 0, 1.0, scales)
        codes = jnp.clip(jnp.round(w / scales), -127, 127).astype(jnp.int8)
        return Quantized(codes, scales, kind, shape, str(kernel.dtype))
    if kind != "nf4":
        raise ValueError(f"lora.quantize must be one of {QUANTIZERS}, got {kind!r}")
    if block_size % 2:
        raise ValueError(f"lora.block_size={block_size} must be even (two 4-bit codes a byte)")
    flat = w.reshape(w.shape[0], -1)
    pad = -flat.shape[1] % block_size
    blocks = jnp.pad(flat, ((0, 0), (0, pad))).reshape(w.shape[0], -1, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    absmax = jnp.where(absmax == 0, 1.0, absmax)
    normed = blocks / absmax[..., None]
    # The nearest level: how many midpoints between neighbouring levels lie below (a search, not a [..., 16] table).
    midpoints = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
    index = jnp.searchsorted(midpoints, normed, side="left").astype(jnp.uint8)
    pairs = index.reshape(*index.shape[:-1], block_size // 2, 2)
    codes = pairs[..., 0] | (pairs[..., 1] << 4)
    return Quantized(codes, absmax, kind, shape, str(kernel.dtype))


class LoraKernel(flax.struct.PyTreeNode):
    """A frozen kernel with its adapter: base [*in, *out] (or Quantized), a [*in, rank], b [rank, *out]; every
    array may carry the same leading axes (the stacked 'layers'). dropout_key: raw key data ([..., 2] uint32), one
    per layer, present when dropout applies (training)."""

    base: Any
    a: jax.Array
    b: jax.Array
    dropout_key: jax.Array | None = None
    scale: float = flax.struct.field(pytree_node=False, default=1.0)
    dropout: float = flax.struct.field(pytree_node=False, default=0.0)


def project(spec: str, x: jax.Array, w: Any) -> jax.Array:
    """`precision.project(spec, x, w)` for a plain, Quantized, LoraKernel or Packed weight (one layer's, no layers
    axis)."""
    if isinstance(w, Packed):
        return w.apply(x).astype(x.dtype)
    if isinstance(w, Quantized):
        return precision.project(spec, x, w.dequantize(x.dtype))
    if not isinstance(w, LoraKernel):
        return precision.project(spec, x, w)
    base = w.base.dequantize(x.dtype) if isinstance(w.base, Quantized) else w.base
    y = precision.project(spec, x, base)
    inputs, out = spec.split("->")
    x_spec, w_spec = inputs.split(",")
    w_in, w_out = w_spec[: w.a.ndim - 1], w_spec[w.a.ndim - 1:]
    x_rest = "".join(ch for ch in x_spec if ch not in w_in)
    if w.dropout_key is not None and w.dropout > 0:
        keep = jax.random.bernoulli(jax.random.wrap_key_data(w.dropout_key), 1.0 - w.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - w.dropout), 0).astype(x.dtype)
    xa = precision.project(f"{x_spec},{w_in}z->{x_rest}z", x, w.a)
    delta = precision.project(f"{x_rest}z,z{w_out}->{out}", xa * jnp.asarray(w.scale, xa.dtype), w.b)
    return y + delta.astype(y.dtype)


# --- parameter trees -------------------------------------------------------------------------------------------

def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _get(tree: Any, keys: tuple[str, ...]) -> Any:
    for k in keys:
        tree = tree[k]
    return tree


def _set(tree: dict, keys: tuple[str, ...], value: Any) -> dict:
    """A copy of nested dict `tree` with `value` at `keys` (only the dicts along the path are copied)."""
    if not keys:
        return value
    return {**tree, keys[0]: _set(tree[keys[0]], keys[1:], value)}


def target_paths(params: Any, spec: LoraSpec) -> list[tuple[str, ...]]:
    """Key paths of the kernels `spec.targets` selects; an error when it selects none or a non-projection."""
    found = []
    flat = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, (nn.LogicallyPartitioned, Quantized)))[0]
    for path, _ in flat:
        name = _path_name(path)
        if not re.search(spec.targets, name):
            continue
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        if len(keys) != 2 or keys[0] != "layers" or keys[1] not in PROJECTIONS:
            raise ValueError(f"config.lora.targets={spec.targets!r} selects {name!r}, which is not a projection "
                             f"kernel; adaptable: {', '.join('layers/' + p for p in PROJECTIONS)}")
        found.append(keys)
    if not found:
        raise ValueError(f"config.lora.targets={spec.targets!r} selects no parameter; adaptable: "
                         f"{', '.join('layers/' + p for p in PROJECTIONS)}")
    return found


def adapter_shapes(boxed_params: Any, spec: LoraSpec, dtype=jnp.float32) -> dict:
    """Boxed (logically partitioned) abstract adapters {"lora": {"layers": {name: {"a", "b"}}}} for the boxed
    abstract model params: A [layers, *in, rank] and B [layers, rank, *out] take the kernel's axis names (the rank
    axis is replicated), so adapters shard by the same rules as the kernels they adapt.

    Adapters are float32 whatever the base's dtype (as PEFT keeps them): they are the weights being trained, and a
    bfloat16 base is there to save memory, which adapters barely use. The forward casts them to the compute dtype."""
    out: dict = {}
    for keys in target_paths(boxed_params, spec):
        boxed = _get(boxed_params, keys)
        n_in = PROJECTIONS[keys[-1]]
        shape, names = boxed.value.shape, boxed.names
        dt = jnp.dtype(dtype)
        a = nn.LogicallyPartitioned(jax.ShapeDtypeStruct((*shape[: 1 + n_in], spec.rank), dt),
                                    (*names[: 1 + n_in], None))
        b = nn.LogicallyPartitioned(jax.ShapeDtypeStruct((shape[0], spec.rank, *shape[1 + n_in:]), dt),
                                    (names[0], None, *names[1 + n_in:]))
        out = _set_new(out, keys, {"a": a, "b": b})
    return {"lora": out}


def _set_new(tree: dict, keys: tuple[str, ...], value: Any) -> dict:
    if len(keys) == 1:
        return {**tree, keys[0]: value}
    return {**tree, keys[0]: _set_new(tree.get(keys[0], {}), keys[1:], value)}


def adapter_items(trainable: dict) -> Iterator[tuple[tuple[str, ...], dict]]:
    """(kernel key path, {"a", "b"}) for every adapter of a trainable tree."""
    def walk(node, keys):
        if isinstance(node, dict) and set(node) == {"a", "b"}:
            yield keys, node
        elif isinstance(node, dict):
            for k in node:
                yield from walk(node[k], (*keys, k))

    yield from walk(trainable.get("lora", {}), ())


def init_adapters(key: jax.Array, abstract_adapters: Any, spec: LoraSpec) -> dict:
    """A ~ N(0, 1/rank^2) (PEFT's gaussian init: std 1/rank), B = 0; `abstract_adapters` unboxed."""
    def one(path, leaf):
        if _path_name(path).endswith("/b"):
            return jnp.zeros(leaf.shape, leaf.dtype)
        leaf_key = jax.random.fold_in(key, hash(_path_name(path)) % (2 ** 31))
        return (jax.random.normal(leaf_key, leaf.shape, jnp.float32) / spec.rank).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(one, abstract_adapters)


def bind(frozen: Any, trainable: dict, spec: LoraSpec, rng: jax.Array | None = None) -> Any:
    """The params the model reads: `frozen` with a LoraKernel at each adapted kernel and the fully trained entries
    (trainable["full"], e.g. a value head) in place. rng (a key): dropout keys, one per layer and kernel."""
    params = frozen
    for i, (keys, ab) in enumerate(adapter_items(trainable)):
        dropout_key = None
        if rng is not None and spec.dropout > 0:
            layers = ab["a"].shape[0]
            dropout_key = jax.random.key_data(jax.random.split(jax.random.fold_in(rng, i), layers))
        kernel = LoraKernel(_get(frozen, keys), ab["a"], ab["b"], dropout_key, spec.scale, spec.dropout)
        params = _set(params, keys, kernel)
    for path, value in jax.tree_util.tree_flatten_with_path(trainable.get("full", {}))[0]:
        params = _set(params, tuple(str(getattr(k, "key", k)) for k in path), value)
    return params


def quantize_frozen(params: Any, spec: LoraSpec) -> Any:
    """QLoRA: every projection kernel of `params` (layers/*_proj) stored as `spec.quantize`; the rest as is."""
    if spec.quantize == "none":
        return params
    layers = dict(params["layers"])
    for name, n_in in PROJECTIONS.items():
        layers[name] = quantize(layers[name], spec.quantize, n_in, spec.block_size)
    return {**params, "layers": layers}


def dequantize_tree(params: Any) -> Any:
    """Every Quantized kernel of `params` back in its stored dtype."""
    return jax.tree.map(lambda x: x.dequantize() if isinstance(x, Quantized) else x, params,
                        is_leaf=lambda x: isinstance(x, Quantized))


def _merged(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """W + scale * A B for one stacked kernel w [layers, *in, *out] (in float32, then w's dtype)."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    delta = jnp.einsum("lir,lro->lio", a.reshape(a.shape[0], -1, a.shape[-1]),
                       b.reshape(b.shape[0], b.shape[1], -1)).reshape(w.shape)
    return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)


def merge(frozen: Any, trainable: dict, spec: LoraSpec) -> Any:
    """Plain params with every adapter folded in: W + scale * A B (in float32, then the kernel's dtype);
    quantised kernels come back dequantised."""
    params = dequantize_tree(frozen)
    for keys, ab in adapter_items(trainable):
        params = _set(params, keys, _merged(_get(params, keys), ab["a"], ab["b"], spec.scale))
    for path, value in jax.tree_util.tree_flatten_with_path(trainable.get("full", {}))[0]:
        params = _set(params, tuple(str(getattr(k, "key", k)) for k in path), value)
    return params


def fold(params: Any) -> Any:
    """`bind`'s output (or any params) with every LoraKernel replaced by its merged kernel, as `merge` gives
    (dropout, a training-time thing, does not apply); plain params come back unchanged."""
    def one(w):
        if not isinstance(w, LoraKernel):
            return w
        base = w.base.dequantize() if isinstance(w.base, Quantized) else w.base
        return _merged(base, w.a, w.b, w.scale)

    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, LoraKernel))
