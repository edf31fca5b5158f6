"""One large tensor merged sharded over this host's devices: statistics on the host, the combine jitted on device.

The inputs [S] are placed with a NamedSharding over a 1-D mesh of the local devices, split along their
largest axis divisible by the device count; the elementwise combine (`methods.combine`, the same code
as the host path) runs jitted on the shards and the merged float32 [S] comes back to the host. The
whole-tensor statistics (TIES thresholds, DARE rescales, angles) and DARE's masks are computed on the
host from the documented numpy streams, so results equal `methods.merge_tensor` to float32 rounding.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alignment.merge import kernels
from alignment.merge.methods import METHODS, NO_BASE, TensorParams, check_finite, combine, flat_float32, statistics

AXIS = "shard"


def shard_axis(shape: Sequence[int], num_devices: int) -> int | None:
    """The largest axis of `shape` divisible by `num_devices` (the first among equals); None if none is."""
    divisible = [(size, -axis) for axis, size in enumerate(shape) if size % num_devices == 0]
    return -max(divisible)[1] if divisible else None


def use_mesh(shape: Sequence[int], min_elements: int) -> bool:
    """Shard when there are several local devices, the tensor has `min_elements` (> 0) and an axis divides."""
    n = jax.local_device_count()
    return (n > 1 and 0 < min_elements <= int(np.prod(shape))
            and shard_axis(shape, n) is not None)


@functools.partial(jax.jit, static_argnames=("name", "normalize", "election"))
def _combine(models, base, keeps, numbers, *, name: str, normalize: bool, election: str):
    """`combine` on device: models/base/keeps sharded [S]; numbers: float32 weights [N], lam [] and the statistics
    but DARE's cuts."""
    b = None if base is None else base.astype(jnp.float32)
    taus = [m.astype(jnp.float32) if b is None else m.astype(jnp.float32) - b for m in models]
    p = TensorParams(weights=tuple(numbers["weights"]), lam=numbers["lam"], normalize=normalize, election=election)
    stats = {k: v for k, v in numbers.items() if k not in ("weights", "lam")}
    return combine(jnp, METHODS[name], taus, b, p, keeps=keeps, **stats)


def merge_tensor_sharded(name: str, models: Sequence[np.ndarray], base: np.ndarray | None, p: TensorParams,
                         seed: Sequence[int]) -> np.ndarray:
    """`methods.merge_tensor` with the combine on the local devices; models/base [S] -> float32 [S]."""
    check_finite([*models, *([] if base is None else [base])])
    method = METHODS[name]
    shape = np.shape(models[0])
    devices = jax.local_devices()
    spec = [None] * len(shape)
    spec[shard_axis(shape, len(devices))] = AXIS
    sharding = NamedSharding(Mesh(np.asarray(devices), (AXIS,)), PartitionSpec(*spec))
    flat = flat_float32(models)
    keys = kernels.dare_keys(seed, len(models))
    stats = statistics(method, flat, NO_BASE if base is None else flat_float32([base])[0], p, keys)
    cuts = stats.pop("cuts", None)
    numbers = {k: np.asarray(v, np.float32) for k, v in stats.items()}
    numbers.update(weights=np.asarray(p.weights, np.float32), lam=np.float32(p.lam))
    keeps = None
    if method.random:  # the host's DARE draws, so both paths drop the same entries
        index = np.arange(flat[0].size, dtype=np.uint32)
        keeps = [jax.device_put((kernels.dare_bits(np, key, index) < cut).reshape(shape), sharding)
                 for key, cut in zip(keys, cuts)]
    put = functools.partial(jax.device_put, device=sharding)
    merged = _combine([put(m) for m in models], None if base is None else put(base), keeps, numbers,
                      name=name, normalize=p.normalize, election=p.election)
    return np.asarray(merged)
