"""Train state and its sharded initialisation."""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alignment import sharding
from alignment.models import lora as lora_lib


class TrainState(flax.struct.PyTreeNode):
    """Everything a step updates. `rng` holds raw key data (uint32 [2]) so it checkpoints like any array.

    With LoRA (`lora` set), `params` are the trainable adapters (and fully trained entries such as a value head)
    and `frozen` the base model: never differentiated, no optimizer state, not checkpointed (train/adapters.py).
    """

    step: jax.Array  # [] int32
    params: Any
    opt_state: Any
    rng: jax.Array
    frozen: Any = None
    lora: Any = flax.struct.field(pytree_node=False, default=None)  # a models.lora.LoraSpec

    def model_params(self, rng: jax.Array | None = None) -> Any:
        """The params the model reads: `params`, or the frozen base bound to the adapters (rng: LoRA dropout)."""
        if self.lora is None:
            return self.params
        return lora_lib.bind(self.frozen, self.params, self.lora, rng)

    def bind(self, trainable: Any, rng: jax.Array | None = None) -> Any:
        """`model_params` for other trainable values (what the step differentiates)."""
        return trainable if self.lora is None else lora_lib.bind(self.frozen, trainable, self.lora, rng)


def abstract_params(model: nn.Module, init_inputs: tuple) -> Any:
    """Boxed (logically partitioned) parameter shapes, without allocating anything."""
    return jax.eval_shape(lambda key: model.init(key, *init_inputs)["params"], jax.random.key(0))


def _opt_state_shardings(opt_state: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Optimizer moments mirror the parameter tree and take its shardings (frozen parameters' moments are
    `optax.MaskedNode`s); scalar counters are replicated."""
    params_def = jax.tree.structure(params)
    replicated = NamedSharding(mesh, PartitionSpec())
    masked = lambda n: isinstance(n, optax.MaskedNode)  # noqa: E731
    mirrors = lambda n: jax.tree.structure(n, is_leaf=masked) == params_def  # noqa: E731

    def one(node):
        if mirrors(node):
            return jax.tree.map(lambda n, s: n if masked(n) else s, node, param_shardings, is_leaf=masked)
        if getattr(node, "ndim", None) == 0:
            return replicated
        raise ValueError(f"optimizer state leaf of shape {getattr(node, 'shape', None)} does not mirror the "
                         "parameters; cannot derive its sharding")

    return jax.tree.map(one, opt_state, is_leaf=mirrors)


def state_shardings(model: nn.Module, optimizer: optax.GradientTransformation, mesh: Mesh,
                    rules: Mapping[str, Any], init_inputs: tuple) -> tuple[TrainState, TrainState]:
    """(abstract unboxed state, NamedSharding tree of the same structure)."""
    boxed = abstract_params(model, init_inputs)
    p_shardings = sharding.param_shardings(boxed, mesh, rules)
    params = nn.meta.unbox(boxed)
    opt_state = jax.eval_shape(optimizer.init, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_state,
                          rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    shardings = TrainState(step=replicated, params=p_shardings,
                           opt_state=_opt_state_shardings(opt_state, params, p_shardings, mesh), rng=replicated)
    return abstract, shardings


def init_state(model: nn.Module, optimizer: optax.GradientTransformation, shardings: TrainState, seed: int,
               init_inputs: tuple, params: Any | None = None) -> TrainState:
    """A fresh state laid out by `shardings`; `params` (e.g. imported weights) replace the random init."""

    def fresh(key, p):
        init_key, state_key = jax.random.split(key)
        if p is None:
            p = nn.meta.unbox(model.init(init_key, *init_inputs)["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p),
                          rng=jax.random.key_data(state_key))

    if params is not None:
        params = jax.device_put(params, shardings.params)
    return jax.jit(fresh, out_shardings=shardings)(jax.random.key(seed), params)
