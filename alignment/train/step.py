"""The jitted train step: micro-batch accumulation of (sum, count) pairs, then one optimizer update.

A loss function has the signature
    loss_fn(params, batch, rng) -> (loss_sum, (count, metrics))
where `loss_sum` is a sum over tokens (or samples) and `count` how many were summed. The step sums
both over micro-batches and divides once, so N micro-batches give exactly the big-batch gradient.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from alignment.train.state import TrainState

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, tuple[jax.Array, dict]]]


def split_micro_batches(batch: dict, num: int) -> dict:
    """[batch, ...] -> [num, batch // num, ...], micro-batch i taking rows i, i + num, ... so that each
    device keeps its own rows when the batch is sharded in contiguous blocks."""

    def split(x):
        if x.shape[0] % num:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {num} micro-batches")
        return x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def combine_metrics(total: dict, new: dict) -> dict:
    """Metrics of two micro-batches as one: summed, except those named `*_max` (maxima of non-negative
    quantities), which keep the larger."""
    return {k: jnp.maximum(total[k], v) if k.endswith("_max") else total[k] + v for k, v in new.items()}


def accumulate_gradients(loss_fn: LossFn, params, batch: dict, rng, num_micro_batches: int):
    """(grad of the summed loss, loss_sum, count, metrics combined by `combine_metrics`) over `num_micro_batches`."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_micro_batches == 1:
        (loss_sum, (count, metrics)), grads = grad_fn(params, batch, rng)
        return grads, loss_sum, count, metrics

    micro = split_micro_batches(batch, num_micro_batches)
    rngs = jax.random.split(rng, num_micro_batches)

    def body(carry, xs):
        mb, key = xs
        (loss_sum, (count, metrics)), grads = grad_fn(params, mb, key)
        total_grads, total_loss, total_count, total_metrics = carry
        return (jax.tree.map(jnp.add, total_grads, grads), total_loss + loss_sum, total_count + count,
                combine_metrics(total_metrics, metrics)), None

    zero_metrics = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), rngs[0])[0][1][1])
    init = (
        jax.tree.map(jnp.zeros_like, params),
        jnp.zeros((), jnp.float32),
        jnp.zeros((), jnp.float32),
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_metrics),
    )
    (grads, loss_sum, count, metrics), _ = jax.lax.scan(body, init, (micro, rngs))
    return grads, loss_sum, count, metrics


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    num_micro_batches: int = 1) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """step(state, batch) -> (new state, metrics); pure, so it can be jitted with any shardings."""

    def step(state: TrainState, batch: dict):
        key, step_key = jax.random.split(jax.random.wrap_key_data(state.rng))
        # With LoRA only the adapters are differentiated; the loss reads them bound to the frozen base.
        bound = loss_fn if state.lora is None else (
            lambda p, b, r: loss_fn(state.bind(p, jax.random.fold_in(r, 1)), b, r))
        grads, loss_sum, count, metrics = accumulate_gradients(
            bound, state.params, batch, step_key, num_micro_batches)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: (g / denom).astype(g.dtype), grads)
        grad_norm = optax.tree.norm(grads)

        def update(params_and_moments):
            params, opt_state = params_and_moments
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        # A NaN/Inf loss or gradient skips the update (params and moments unchanged) and is counted. A cond,
        # not a select per leaf: the update then runs in place on the donated buffers (a select kept the
        # old values alive, which doubled the optimizer's memory traffic).
        finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
        params, opt_state = jax.lax.cond(finite, update, lambda old: old, (state.params, state.opt_state))
        metrics = dict(metrics, loss=loss_sum / denom, count=count, grad_norm=grad_norm,
                       learning_rate=schedule(state.step), skipped=1.0 - finite.astype(jnp.float32))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  rng=jax.random.key_data(key))
        return new_state, metrics

    return step


def jit_train_step(step: Callable, state_shardings: TrainState, batch_shardings: Any) -> Callable:
    """The step compiled with explicit in/out shardings; the old state's buffers are donated.

    `batch_shardings` None keeps each batch array's own layout (as `runtime.place_batch` made it)."""
    replicated = NamedSharding(jax.tree.leaves(state_shardings)[0].mesh, jax.sharding.PartitionSpec())
    if state_shardings.frozen is None:
        return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                       out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    # A LoRA base is not donated: it is the same before and after, and the reference model of DPO / GRPO reads it.
    trainable = state_shardings.replace(frozen=None)
    inner = jax.jit(lambda s, frozen, b: _without_frozen(step(s.replace(frozen=frozen), b)),
                    in_shardings=(trainable, state_shardings.frozen, batch_shardings),
                    out_shardings=(trainable, replicated), donate_argnums=(0,))

    def run(state: TrainState, batch):
        new_state, metrics = inner(state.replace(frozen=None), state.frozen, batch)
        return new_state.replace(frozen=state.frozen), metrics

    return run


def _without_frozen(out):
    state, metrics = out
    return state.replace(frozen=None), metrics
