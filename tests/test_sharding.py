"""Mesh construction, logical rules, and the 1-device vs 8-device equivalence of a train step."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from alignment import sharding
from alignment.algorithms.sft import sft_loss
from alignment.models import ModelConfig, Transformer
from alignment.models.transformer import dummy_inputs
from alignment.train.optimizer import make_optimizer
from alignment.train.state import abstract_params, init_state, state_shardings
from alignment.train.step import jit_train_step, make_train_step

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, qkv_bias=True)
OPTIMIZER = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=0, schedule="constant", end_lr_factor=1.0,
                                           b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0))


def random_batch(seed: int, rows: int = 8, seq: int = 16) -> dict:
    """Two packed samples per row with padding at the end, random tokens and loss mask."""
    rng = np.random.default_rng(seed)
    split = rng.integers(3, seq - 4, size=rows)
    length = rng.integers(split + 2, seq + 1)
    idx = np.arange(seq)[None]
    segment_ids = np.where(idx < split[:, None], 1, np.where(idx < length[:, None], 2, 0)).astype(np.int32)
    positions = np.where(segment_ids == 2, idx - split[:, None], idx) * (segment_ids != 0)
    return dict(
        inputs=rng.integers(0, 64, (rows, seq)).astype(np.int32),
        targets=rng.integers(0, 64, (rows, seq)).astype(np.int32),
        loss_mask=(rng.random((rows, seq)) < 0.7) & (segment_ids != 0),
        positions=positions.astype(np.int32),
        segment_ids=segment_ids,
    )


def run_steps(mesh_axes: dict, devices, num_steps: int = 2, micro_batches: int = 1):
    model = Transformer(CONFIG)
    mesh = sharding.make_mesh(mesh_axes, devices)
    optimizer, schedule = make_optimizer(OPTIMIZER, 10)
    _, shardings = state_shardings(model, optimizer, mesh, sharding.DEFAULT_RULES, dummy_inputs())
    state = init_state(model, optimizer, shardings, 0, dummy_inputs())
    batch_sharding = sharding.named_sharding(mesh, sharding.DEFAULT_RULES, "batch", "seq")
    step = jit_train_step(make_train_step(functools.partial(sft_loss, Transformer(CONFIG)), optimizer,
                                          schedule, micro_batches), shardings, batch_sharding)
    with sharding.activation_sharding(mesh, sharding.DEFAULT_RULES):
        losses = []
        for i in range(num_steps):
            batch = jax.device_put(random_batch(i), batch_sharding)
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), state


@pytest.fixture(scope="module")
def one_device_run():
    return run_steps(dict(data=1), jax.devices()[:1])


@pytest.mark.parametrize("mesh_axes", [dict(data=2, fsdp=2, tensor=2), dict(data=8), dict(data=4, sequence=2)])
def test_one_vs_eight_devices(mesh_axes, one_device_run):
    losses_1, params_1, _ = one_device_run
    losses_8, params_8, state_8 = run_steps(mesh_axes, jax.devices())
    np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(params_8), jax.tree.leaves(params_1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    q_proj = state_8.params["layers"]["q_proj"]
    assert q_proj.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)


def test_sequence_parallel_attention_uses_all_to_all():
    """Ulysses: the compiled step re-shards around attention with all-to-all, not by gathering K/V."""
    model = Transformer(CONFIG)
    mesh = sharding.make_mesh(dict(data=4, sequence=2))
    batch_sharding = sharding.named_sharding(mesh, sharding.DEFAULT_RULES, "batch", "seq")
    params = abstract_params(model, dummy_inputs())
    batch = jax.device_put(random_batch(0), batch_sharding)
    with sharding.activation_sharding(mesh, sharding.DEFAULT_RULES):
        hlo = jax.jit(lambda p, b: model.apply({"params": p}, b["inputs"], b["positions"], b["segment_ids"])
                      ).lower(nn.meta.unbox(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)),
                              batch).compile().as_text()
    assert "all-to-all" in hlo


def test_micro_batches_equal_big_batch(one_device_run):
    losses_1, params_1, _ = one_device_run
    losses_4, params_4, _ = run_steps(dict(data=1), jax.devices()[:1], micro_batches=4)
    np.testing.assert_allclose(losses_4, losses_1, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(params_4), jax.tree.leaves(params_1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_mesh_fills_minus_one_and_rejects_bad_sizes():
    mesh = sharding.make_mesh(dict(data=-1, tensor=2))
    assert dict(mesh.shape) == dict(data=4, fsdp=1, tensor=2, sequence=1)
    with pytest.raises(ValueError, match="need 6 devices"):
        sharding.make_mesh(dict(data=3, tensor=2))
    with pytest.raises(ValueError, match="unknown axes"):
        sharding.make_mesh(dict(model=2))


def test_unmatched_logical_axis_is_an_error():
    rules = dict(sharding.DEFAULT_RULES)
    del rules["mlp"]
    boxed = abstract_params(Transformer(CONFIG), dummy_inputs())
    with pytest.raises(ValueError, match="no sharding rule for logical axis 'mlp' of .*_proj"):
        sharding.param_shardings(boxed, sharding.make_mesh(dict(data=8)), rules)


def test_parameter_without_names_is_an_error():
    class Bare(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(x)

    boxed = jax.eval_shape(lambda k: Bare().init(k, jnp.ones((1, 4)))["params"], jax.random.key(0))
    with pytest.raises(ValueError, match="no logical axis names"):
        sharding.param_shardings(boxed, sharding.make_mesh(dict(data=8)), sharding.DEFAULT_RULES)


def test_indivisible_dimension_is_named():
    config = ModelConfig(vocab_size=66, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2)
    boxed = abstract_params(Transformer(config), dummy_inputs())
    with pytest.raises(ValueError, match=r"\['embed'\].*66.*'tensor'"):
        sharding.param_shardings(boxed, sharding.make_mesh(dict(data=2, tensor=4)), sharding.DEFAULT_RULES)
