"""Device mesh from config and logical-axis rules for every parameter and activation.

Parameters and activations are annotated with logical axis names ('embed', 'heads', 'batch', ...).
`rules` map each logical name to a mesh axis (or a tuple of them, or None = replicated). A logical
name without a rule is an error, so nothing is replicated by accident.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

DEFAULT_RULES: dict[str, Any] = {
    # activations
    "batch": ("data", "fsdp"),
    "seq": "sequence",
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
    "value_out": None,
}


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over `MESH_AXES`; one size may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    unknown = set(axis_sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axes {sorted(unknown)}; valid axes are {MESH_AXES}")
    sizes = [int(axis_sizes.get(name, 1)) for name in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by the fixed axes product {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh: axes {dict(zip(MESH_AXES, sizes))} need {math.prod(sizes)} devices, {len(devices)} available"
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(names: Sequence[str | None], rules: Mapping[str, Any], where: str = "") -> PartitionSpec:
    """PartitionSpec for a tuple of logical axis names; unknown names raise."""
    axes = []
    for name in names:
        if name is None:
            axes.append(None)
            continue
        if name not in rules:
            raise ValueError(f"no sharding rule for logical axis {name!r}{' of ' + where if where else ''}; "
                             f"add it to the rules (known: {sorted(rules)})")
        axes.append(rules[name])
    return PartitionSpec(*axes)


def _axis_size(mesh: Mesh, axis: Any) -> int:
    if axis is None:
        return 1
    if isinstance(axis, str):
        return mesh.shape[axis]
    return math.prod(mesh.shape[a] for a in axis)


def check_divisible(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh, where: str) -> None:
    for dim, axis in zip(shape, spec):
        size = _axis_size(mesh, axis)
        if dim % size:
            raise ValueError(f"{where}: dimension {dim} of shape {tuple(shape)} is sharded over mesh axes "
                             f"{axis!r} of size {size}, which does not divide it")


def param_shardings(boxed_params: Any, mesh: Mesh, rules: Mapping[str, Any]) -> Any:
    """NamedShardings for a tree of `nn.LogicallyPartitioned` leaves (e.g. from `jax.eval_shape(model.init)`).

    A leaf without logical names is an error naming its path.
    """

    def one(path, leaf):
        where = jax.tree_util.keystr(path)
        if not isinstance(leaf, nn.LogicallyPartitioned):
            raise ValueError(f"parameter {where} has no logical axis names; declare it with logical partitioning")
        spec = logical_to_spec(leaf.names, rules, where)
        check_divisible(leaf.value.shape, spec, mesh, f"parameter {where}")
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(
        one, boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )


def named_sharding(mesh: Mesh, rules: Mapping[str, Any], *names: str | None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, rules))


# The activation-sharding context: set while tracing a step so model code can annotate activations
# without threading the mesh through every function.
_ACTIVATION_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Mapping[str, Any]):
    token = _ACTIVATION_CONTEXT.set((mesh, dict(rules)))
    try:
        yield
    finally:
        _ACTIVATION_CONTEXT.reset(token)


def current_activation_sharding() -> tuple[Mesh, dict] | None:
    """(mesh, rules) set by the enclosing `activation_sharding`, or None outside it."""
    return _ACTIVATION_CONTEXT.get()


@contextlib.contextmanager
def manual_region():
    """Inside a shard_map body: per-device code must not add mesh-wide constraints or nest shard_maps."""
    token = _ACTIVATION_CONTEXT.set(None)
    try:
        yield
    finally:
        _ACTIVATION_CONTEXT.reset(token)


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op outside `activation_sharding`."""
    context = _ACTIVATION_CONTEXT.get()
    if context is None:
        return x
    mesh, rules = context
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))
