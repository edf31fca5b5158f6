"""Checkpoint round-trips, resharding across meshes, retention, mismatch detection and params-only loads."""
import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from alignment import checkpoint
from alignment.checkpoint import Checkpointer, load_params
from alignment.models.config import ModelConfig
from alignment.models.transformer import Transformer, dummy_inputs
from alignment.sharding import DEFAULT_RULES, make_mesh
from alignment.train.optimizer import make_optimizer
from alignment.train.state import init_state, state_shardings

MESH_8 = {"data": 2, "fsdp": 2, "tensor": 2}


def tiny_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    return ModelConfig(**{**values, **overrides})


def optimizer() -> optax.GradientTransformation:
    config = ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=1, schedule="cosine", end_lr_factor=0.1, b1=0.9,
                                            b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0))
    return make_optimizer(config, total_steps=10)[0]


def setup(mesh, **overrides):
    """(abstract state, shardings) for the tiny model on `mesh`."""
    return state_shardings(Transformer(tiny_config(**overrides)), optimizer(), mesh, DEFAULT_RULES, dummy_inputs())


def perturbed(state, seed: int = 0):
    """`state` with noise on every leaf, so no restored value can pass by coinciding with the init.

    Done on the host: jitting a real update on the 8-device mesh would cost more compile time than the file's budget.
    """
    rng = np.random.default_rng(seed)

    def noise(x):
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.floating):
            return x + rng.normal(size=x.shape).astype(x.dtype)
        return x + rng.integers(1, 1000, size=x.shape).astype(x.dtype)

    return jax.tree.map(noise, state)


def one_device_mesh():
    return make_mesh({"data": 1}, devices=jax.devices()[:1])


def assert_trees_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(leaves_a, leaves_b):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_shardings(tree, shardings):
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        assert leaf.sharding == sharding


@pytest.fixture(scope="module")
def state():
    """A perturbed tiny-model state laid out on the 8-device mesh."""
    _, shardings = setup(one_device_mesh())
    host = perturbed(init_state(Transformer(tiny_config()), optimizer(), shardings, seed=0,
                                init_inputs=dummy_inputs()))
    return jax.device_put(host, setup(make_mesh(MESH_8))[1])


@pytest.fixture(scope="module")
def saved(tmp_path_factory, state):
    """`state` saved asynchronously at its step with a data-iterator position."""
    directory = tmp_path_factory.mktemp("ckpt")
    data_state = {"epoch": 1, "position": 17, "files": ["a.jsonl", "b.jsonl"]}
    with Checkpointer(directory, async_save=True) as ckpt:
        assert ckpt.save(int(state.step), state, data_state)
        ckpt.wait()
    return directory, state, data_state


def test_round_trip_same_mesh(saved):
    directory, state, data_state = saved
    abstract, shardings = setup(make_mesh(MESH_8))
    with Checkpointer(directory) as ckpt:
        assert ckpt.latest_step() == int(state.step)
        restored, restored_data = ckpt.restore(abstract, shardings)
    assert_trees_equal(restored, state)
    assert int(restored.step) == int(state.step)
    np.testing.assert_array_equal(restored.rng, state.rng)
    assert restored_data == data_state
    assert_shardings(restored, shardings)


@pytest.mark.parametrize("mesh", [one_device_mesh, lambda: make_mesh({"fsdp": 8})], ids=["1-device", "fsdp8"])
def test_restore_onto_other_mesh(saved, mesh):
    directory, state, _ = saved
    abstract, shardings = setup(mesh())
    with Checkpointer(directory) as ckpt:
        restored, _ = ckpt.restore(abstract, shardings)
    assert_trees_equal(restored, state)
    assert_shardings(restored, shardings)


def test_keeps_last_n(tmp_path, state):
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in range(1, 6):
            assert ckpt.save(step, state)
        ckpt.wait()
        assert ckpt.latest_step() == 5
        abstract, shardings = setup(one_device_mesh())
        assert ckpt.restore(abstract, shardings)[1] is None  # no data_state given -> None back
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [4, 5]


@pytest.mark.parametrize("overrides, expected", [
    (dict(vocab_size=96), ["params/embed: expected (96, 32) float32, found (64, 32) float32",
                           "params/lm_head: expected (32, 96) float32, found (32, 64) float32"]),
    (dict(num_layers=3), ["params/layers/", "(3, 32) float32, found (2, 32) float32"]),
], ids=["vocab", "layers"])
def test_mismatch_raises_before_loading(saved, monkeypatch, overrides, expected):
    directory, _, _ = saved
    abstract, shardings = setup(one_device_mesh(), **overrides)

    def no_load(*args, **kwargs):
        raise AssertionError("tensors were read despite the mismatch")

    monkeypatch.setattr(ocp.CheckpointManager, "restore", no_load)
    with Checkpointer(directory) as ckpt, pytest.raises(ValueError) as error:
        ckpt.restore(abstract, shardings)
    for text in expected:
        assert text in str(error.value)
    # Moments mirror the params, so they are reported too: every offending tensor is listed.
    assert "opt_state/" in str(error.value)
    with pytest.raises(ValueError, match="params/"):
        load_params(directory, abstract.params, shardings.params)


def test_missing_checkpoint(tmp_path):
    abstract, shardings = setup(one_device_mesh())
    with Checkpointer(tmp_path / "empty") as ckpt, pytest.raises(FileNotFoundError, match="empty"):
        ckpt.restore(abstract, shardings)
    with pytest.raises(FileNotFoundError, match="empty"):
        load_params(tmp_path / "empty", abstract.params, shardings.params)


@pytest.mark.parametrize("step_dir", [False, True], ids=["root", "step-dir"])
def test_load_params(saved, step_dir):
    directory, state, _ = saved
    abstract, shardings = setup(one_device_mesh())
    path = directory / str(int(state.step)) if step_dir else directory
    params = load_params(path, abstract.params, shardings.params)
    assert_trees_equal(params, state.params)
    assert_shardings(params, shardings.params)


def test_check_compatible_reports_missing_and_unexpected():
    spec = jax.ShapeDtypeStruct((2,), np.float32)
    with pytest.raises(ValueError) as error:
        checkpoint.check_compatible({"a": spec, "b": spec}, {"a": jax.ShapeDtypeStruct((2,), np.int32), "c": spec},
                                    "test")
    message = str(error.value)
    assert "a: expected (2,) float32, found (2,) int32" in message
    assert "b: expected (2,) float32, missing from checkpoint" in message
    assert "c: not expected, checkpoint has (2,) float32" in message


def test_half_written_checkpoint_falls_back_to_previous(tmp_path, caplog, state):
    """A crash during a save can leave a step directory without its data; restore takes the one before."""
    abstract, shardings = setup(make_mesh(MESH_8))
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(2, state, {"next_index": 2})
        ckpt.save(4, state, {"next_index": 4})
    for array_dir in (tmp_path / "4" / "state").rglob("*"):
        if array_dir.is_file() and array_dir.name != "_CHECKPOINT_METADATA":
            array_dir.write_bytes(b"truncated")
    with Checkpointer(tmp_path, async_save=False) as ckpt, caplog.at_level("WARNING"):
        restored, data_state = ckpt.restore(abstract, shardings)
    assert data_state == {"next_index": 2}
    assert "step 4" in caplog.text and "incomplete or unreadable" in caplog.text
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
