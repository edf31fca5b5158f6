"""runtime.initial_params: a value-head model (reward model) starts from a policy checkpoint without a value head
with that checkpoint's trunk and a zero head; a checkpoint that claims a head it lacks still fails by name."""
import dataclasses

import jax
import ml_collections
import numpy as np
import pytest

from alignment.checkpoint import Checkpointer
from alignment.data import model_info
from alignment.models.config import ModelConfig
from alignment.models.transformer import Transformer, dummy_inputs
from alignment.sharding import DEFAULT_RULES, make_mesh
from alignment.train import runtime
from alignment.train.optimizer import make_optimizer
from alignment.train.state import init_state, state_shardings

MODEL = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


def setup(model_cfg: ModelConfig):
    mesh = make_mesh({"data": -1})
    optimizer = make_optimizer(ml_collections.ConfigDict(dict(
        lr=1e-2, warmup_steps=1, schedule="constant", end_lr_factor=1.0, b1=0.9, b2=0.95, eps=1e-8,
        weight_decay=0.0, clip_norm=1.0)), total_steps=2)[0]
    model = Transformer(model_cfg)
    abstract, shardings = state_shardings(model, optimizer, mesh, DEFAULT_RULES, dummy_inputs())
    return model, optimizer, abstract, shardings


@pytest.fixture(scope="module")
def policy_checkpoint(tmp_path_factory):
    """(directory, params) of a saved policy (no value head) with its model.json, as an SFT run leaves it."""
    directory = str(tmp_path_factory.mktemp("sft") / "checkpoints")
    model, optimizer, _, shardings = setup(MODEL)
    state = init_state(model, optimizer, shardings, seed=3, init_inputs=dummy_inputs())
    with Checkpointer(directory, async_save=False) as ckpt:
        ckpt.save(1, state)
    model_info.describe(directory, model=MODEL, tokenizer="embedded", chat_template="chatml", stage="sft")
    return directory, jax.device_get(state.params)


def config_for(init_from: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(init_from=init_from, model=dataclasses.asdict(MODEL)))


def test_value_head_model_starts_from_a_policy_trunk_with_a_zero_head(policy_checkpoint):
    directory, policy = policy_checkpoint
    rm_cfg = dataclasses.replace(MODEL, value_head=True)
    _, _, abstract, shardings = setup(rm_cfg)
    params = jax.device_get(runtime.initial_params(config_for(directory), rm_cfg, abstract.params, shardings.params))
    assert sorted(params) == sorted([*policy, "value_kernel", "value_bias"])
    jax.tree.map(np.testing.assert_array_equal, {k: params[k] for k in policy}, policy)
    np.testing.assert_array_equal(params["value_kernel"], np.zeros(MODEL.hidden_size, np.float32))
    assert params["value_bias"].shape == () and float(params["value_bias"]) == 0.0


def test_a_checkpoint_without_model_json_must_hold_the_head(tmp_path):
    """No model.json (a run from before it existed): nothing says the head is missing, so loading names it."""
    model, optimizer, _, shardings = setup(MODEL)
    with Checkpointer(str(tmp_path), async_save=False) as ckpt:
        ckpt.save(1, init_state(model, optimizer, shardings, seed=0, init_inputs=dummy_inputs()))
    rm_cfg = dataclasses.replace(MODEL, value_head=True)
    _, _, abstract, shardings = setup(rm_cfg)
    with pytest.raises(ValueError, match="value_kernel: expected .* missing from checkpoint"):
        runtime.initial_params(config_for(str(tmp_path)), rm_cfg, abstract.params, shardings.params)


def test_a_batch_the_mesh_cannot_split_is_named_with_its_fix():
    """12 rows over 8 data shards: one line naming the batch size, the shards and the keys to change, not XLA's."""
    mesh = make_mesh({"data": -1})
    target = runtime.batch_sharding(mesh, dict(DEFAULT_RULES))
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = shards + shards // 2 if shards > 1 else None
    if rows is None:
        pytest.skip("one device: every batch splits")
    with pytest.raises(ValueError, match=rf"a batch of {rows} rows .* {shards} data-parallel shards .*"
                                         r"config\.batch_size"):
        runtime.place_batch({"inputs": np.zeros((rows, 4), np.int32)}, target)
    placed = runtime.place_batch({"inputs": np.zeros((2 * shards, 4), np.int32)}, target)
    assert placed["inputs"].shape == (2 * shards, 4)
