"""Checkpoint round-trips, resharding across meshes, retention, mismatch detection, params-only loads, and
corrupt checkpoints: every file of a saved step deleted or truncated, the run resumes bit-identical."""
import asyncio
import gc
import os
import pathlib
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from alignment import checkpoint
from alignment.checkpoint import Checkpointer, CorruptCheckpoint, load_params
from alignment.config import load_config_file
from alignment.models.config import ModelConfig
from alignment.models.transformer import Transformer, dummy_inputs
from alignment.sharding import DEFAULT_RULES, make_mesh
from alignment import stages
from alignment.train import runtime
from alignment.train.optimizer import make_optimizer
from alignment.train.state import init_state, state_shardings
from tests import persistent_compilation_cache

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


def test_missing_state_metadata_is_corrupt_not_a_mismatch(tmp_path, caplog, state):
    """Without `state/_METADATA` a step cannot describe its tensors: corrupt, never 'does not match the model'."""
    abstract, shardings = setup(make_mesh(MESH_8))
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(2, state, {"next_index": 2})
        ckpt.save(4, state, {"next_index": 4})
    (tmp_path / "4" / "state" / "_METADATA").unlink()
    with pytest.raises(CorruptCheckpoint, match=r"4 is corrupt: its state metadata cannot be read") as error:
        load_params(tmp_path / "4", abstract.params, shardings.params)
    assert "does not match" not in str(error.value)
    with Checkpointer(tmp_path, async_save=False) as ckpt, caplog.at_level("WARNING"):
        assert ckpt.restore(abstract, shardings)[1] == {"next_index": 2}
    assert "step 4" in caplog.text and "incomplete or unreadable" in caplog.text
    assert "does not match" not in caplog.text


def test_corrupt_step_is_moved_aside_and_written_anew(tmp_path, caplog, state):
    """Orbax skips a save at or below its latest step: left in place, a corrupt step would never be rewritten."""
    abstract, shardings = setup(one_device_mesh())
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(2, state, {"next_index": 2})
        ckpt.save(4, state, {"next_index": 4})
    (tmp_path / "4" / "data" / "metadata").unlink()
    with Checkpointer(tmp_path, async_save=False, max_to_keep=1) as ckpt, caplog.at_level("WARNING"):
        assert ckpt.restore(abstract, shardings)[1] == {"next_index": 2}
        assert ckpt.latest_step() == 2
        assert ckpt.save(4, state, {"next_index": 4})
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("4.corrupt-")]
    assert len(moved) == 1 and not (moved[0] / "data" / "metadata").exists()
    assert (moved[0] / "state").is_dir()  # renamed as it was, for inspection; retention (max_to_keep) spares it
    assert f"moved corrupt step 4 aside to {moved[0]}" in caplog.text
    caplog.clear()
    with Checkpointer(tmp_path) as ckpt, caplog.at_level("WARNING"):
        assert ckpt.latest_step() == 4
        assert ckpt.restore(abstract, shardings)[1] == {"next_index": 4}
    assert "incomplete or unreadable" not in caplog.text  # a later start no longer falls back


def test_restore_leftovers_are_not_printed(monkeypatch):
    """Dropped: errors of TensorStore callbacks into the event loop Orbax closed after a failed read, and of
    Orbax's unfinished read coroutines closed later. Any other unraisable exception is still reported."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    checkpoint._drop_restore_leftovers()
    checkpoint._drop_restore_leftovers()  # installed once, however many restores
    namespace = {}
    exec(compile("async def read(): pass", os.path.join(os.sep, "site-packages", "orbax", "serialization.py"), "exec"),
         namespace)
    orbax_read, other = namespace["read"](), asyncio.sleep(0)
    leftovers = [SimpleNamespace(exc_value=RuntimeError("Event loop is closed"), object=None),
                 SimpleNamespace(exc_value=Exception("Encountered error while reading array index"), object=orbax_read)]
    others = [SimpleNamespace(exc_value=RuntimeError("boom"), object=None),
              SimpleNamespace(exc_value=ValueError("bad"), object=other)]
    for unraisable in leftovers + others:
        sys.unraisablehook(unraisable)
    assert seen == others
    orbax_read.close()
    other.close()


def test_unretrieved_reads_of_a_failed_step_are_not_logged(caplog, monkeypatch):
    """asyncio's 'Future exception was never retrieved' for a read under a step whose restore failed is
    dropped; the same report for any other path (including a step with a longer number) still reaches the log."""
    monkeypatch.setattr(checkpoint._UNRETRIEVED_READS, "failed_steps", {os.path.join(os.sep, "run", "ckpt", "4") + os.sep})
    checkpoint._drop_restore_leftovers()
    loop = asyncio.new_event_loop()
    for path in ("/run/ckpt/4/state/d/0f", "/run/ckpt/40/state/d/0f", "/elsewhere/file"):
        future = loop.create_future()
        future.set_exception(ValueError(f'NOT_FOUND: Error reading "{path}"'))
        del future
        gc.collect()
    loop.close()
    reports = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Future exception was never")]
    assert len(reports) == 2 and "/run/ckpt/40/" in reports[0] and "/elsewhere/file" in reports[1], reports


# --- a real run: every file of a saved step deleted or truncated, then a restart --------------------------------

# A tiny SFT run, 4 steps, a checkpoint after each; shared by the in-process runs and the command line.
RUN = {"model.num_layers": 1, "model.hidden_size": 32, "model.intermediate_size": 64, "batch_size": 8, "steps": 4,
       "log_every": 1, "data.num_embedded": 64, "data.num_embedded_eval": 8, "data.max_length": 32,
       "data.pack_buffer": 16, "checkpoint.every": 1, "checkpoint.keep": 3}
REPO = pathlib.Path(__file__).resolve().parents[1]


def run_config():
    config = load_config_file(str(REPO / "configs" / "sft.py"))
    config.update_from_flattened_dict(RUN)
    return config


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """Every restart compiles the same programs; a persistent cache loads them instead (~1 s a run, not ~6)."""
    yield from persistent_compilation_cache(str(tmp_path_factory.mktemp("jax_cache")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, compilation_cache):
    """The uninterrupted run's workdir (checkpoints 2, 3, 4)."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    stages.run("sft", run_config(), str(workdir))
    return workdir


@pytest.fixture(scope="module")
def target():
    """(abstract state, shardings) of the run's model, to read its checkpoints back."""
    config = run_config()
    _, model, mesh, rules = runtime.setup_model(config)
    return state_shardings(model, make_optimizer(config.optimizer, config.steps)[0], mesh, rules, dummy_inputs())


def saved_step(workdir, step, target):
    """(state, data-iterator state) of `step` in the run's workdir."""
    with Checkpointer(workdir / "checkpoints") as ckpt:
        return ckpt.restore(*target, step=step)


@pytest.fixture(scope="module")
def expected(reference, target):
    """step -> what the uninterrupted run saved at steps 3 and 4."""
    return {step: saved_step(reference, step, target) for step in (3, 4)}


def step_files(step_dir: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file())


def damage(path: pathlib.Path, how: str) -> None:
    if how == "delete":
        path.unlink()
    else:  # truncate: what a crash in the middle of writing it leaves
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


def check_resume(reference, expected, target, workdir, name, how, caplog, unraisable) -> None:
    """Stop after step 3 (step 4 never written), damage file `name` of step 3, restart: the run must end on
    exactly the uninterrupted run's steps 3 and 4, falling back to step 2 whenever the damage is detected."""
    shutil.copytree(reference / "checkpoints", workdir / "checkpoints")
    shutil.rmtree(workdir / "checkpoints" / "4")
    damage(workdir / "checkpoints" / "3" / name, how)
    caplog.clear()
    with caplog.at_level("INFO"):
        stages.run("sft", run_config(), str(workdir))
    gc.collect()  # finalizes what a failed restore left unfinished, whose errors must not be printed
    assert not unraisable, unraisable
    moved = [p.name for p in (workdir / "checkpoints").iterdir() if p.name.startswith("3.corrupt-")]
    if "step 3 in" in caplog.text and "incomplete or unreadable" in caplog.text:
        assert "restored step 2" in caplog.text
        assert len(moved) == 1 and "moved corrupt step 3 aside" in caplog.text, moved
    else:
        assert "restored step 3" in caplog.text and not moved
    for step in (3, 4):  # step 3 is sound again: written anew after a fallback, or read fine without one
        state, data_state = saved_step(workdir, step, target)
        assert data_state == expected[step][1]
        assert_trees_equal(state, expected[step][0])


@pytest.mark.parametrize("how", ["delete", "truncate"])
def test_damaged_file_resumes_bit_identical(reference, expected, target, tmp_path, caplog, monkeypatch, how):
    """Each file of a real step in turn (state arrays, ocdbt manifests, _METADATA, _CHECKPOINT_METADATA, the data
    iterator state, ...). One test runs them all, sharing the reference run; failures are reported together."""
    unraisable = []  # what would be printed as 'Exception ignored ...' traces
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(f"{u.exc_type.__name__}: {u.exc_value}"))
    names = step_files(reference / "checkpoints" / "3")
    assert {"state/_METADATA", "data/metadata", "_CHECKPOINT_METADATA"} <= set(names), names
    assert sum("ocdbt" in name or name.startswith("state/d/") for name in names) >= 3, names
    failures = []
    for index, name in enumerate(names):
        try:
            check_resume(reference, expected, target, tmp_path / str(index), name, how, caplog, unraisable)
        except Exception as e:  # noqa: BLE001 - collected, so one run reports every file that fails
            failures.append(f"{how} {name}: {type(e).__name__}: {str(e)[:300]}")
        unraisable.clear()
    assert not failures, "\n".join(failures)


def test_every_checkpoint_corrupt_is_one_error_line(reference, tmp_path):
    """The command line: three corrupt steps (array data, metadata, iterator state) give one warning each and
    one error line, without the traces of Orbax's reads still in flight nor a 'does not match' report."""
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(reference / "checkpoints", checkpoints)
    for path in (checkpoints / "4" / "state").rglob("*"):
        if path.is_file() and "/d/" in str(path):
            path.unlink()
    (checkpoints / "3" / "state" / "_METADATA").unlink()
    damage(checkpoints / "2" / "data" / "metadata", "truncate")
    command = [sys.executable, "-m", "alignment.launch", "--config=configs/sft.py", f"--workdir={tmp_path}",
               *(f"--config.{key}={value}" for key, value in RUN.items())]
    result = subprocess.run(command, cwd=REPO, env=dict(os.environ, XLA_FLAGS=""), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "does not match" not in result.stderr, result.stderr
    not_logged = [line for line in result.stderr.splitlines() if not re.match(r"\d\d:\d\d:\d\d (INFO|WARNING) ", line)]
    assert not_logged == [f"error: no complete checkpoint in {checkpoints}: steps [2, 3, 4] are all incomplete or "
                          "corrupt (reasons in the warnings above); move them away to start afresh"], result.stderr
    assert result.stderr.count("incomplete or unreadable") == 3
    assert sorted(p.name for p in checkpoints.iterdir()) == ["2", "3", "4", "model.json"]  # nothing moved
