"""DeepSpeed-Ulysses sequence parallelism around attention.

Outside attention, activations are split along the sequence over the 'sequence' mesh axis. Attention
needs whole sequences, so an all-to-all turns [batch, seq / sp, heads, head_dim] into
[batch, seq, heads / sp, head_dim], any attention implementation runs on its local heads, and a second
all-to-all turns the result back. Communication is O(activations / sp), independent of the number of
layers' keys, unlike gathering all keys and values.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
from jax.sharding import PartitionSpec as P

from alignment.sharding import current_activation_sharding, manual_region


def _ulysses_local(attention: Callable, q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions):
    """Per-device body: local sequence chunk, all heads -> whole sequence, local heads -> back."""
    to_heads = functools.partial(jax.lax.all_to_all, axis_name="sequence", split_axis=2, concat_axis=1, tiled=True)
    gather = functools.partial(jax.lax.all_gather, axis_name="sequence", axis=1, tiled=True)
    out = attention(to_heads(q), to_heads(k), to_heads(v), gather(q_segment_ids), gather(kv_segment_ids),
                    gather(q_positions), gather(kv_positions))
    return jax.lax.all_to_all(out, "sequence", split_axis=1, concat_axis=2, tiled=True)


def with_sequence_parallelism(attention: Callable) -> Callable:
    """`attention` itself, or its Ulysses form when the active mesh has a 'sequence' axis larger than 1."""
    context = current_activation_sharding()
    if context is None or context[0].shape.get("sequence", 1) == 1:
        return attention
    mesh, rules = context
    batch, heads, kv_heads = rules["batch"], rules["act_heads"], rules["act_kv_heads"]

    def wrapped(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions):
        for name, x, axis in (("heads", q, heads), ("kv_heads", k, kv_heads)):
            shards = mesh.shape["sequence"] * (mesh.shape[axis] if isinstance(axis, str) else 1)
            if x.shape[2] % shards:
                raise ValueError(f"sequence parallelism: {x.shape[2]} {name} do not split over {shards} "
                                 f"devices (sequence x {axis}); lower mesh.sequence")
        qs, ks = P(batch, "sequence", heads, None), P(batch, "sequence", kv_heads, None)
        ids = P(batch, "sequence")
        with manual_region():
            return jax.shard_map(functools.partial(_ulysses_local, attention), mesh=mesh,
                                 in_specs=(qs, ks, ks, ids, ids, ids, ids), out_specs=qs, check_vma=False)(
                q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions)

    return wrapped
