"""Streaming merges of real checkpoints: Orbax and HF paths, per-layer parameters, atomic output, bad input, stage."""
import dataclasses
import json
import os
import threading
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from alignment import config as config_lib
from alignment.checkpoint import load_params
from alignment.merge import merge_checkpoints, streaming
from alignment.merge.checkpoint_io import open_source
from alignment.merge.demo import make_demo_checkpoints, random_params, save_params
from alignment.models import Transformer
from alignment.models.config import ModelConfig
from alignment.models.hf import load_hf_checkpoint, save_hf_checkpoint
from alignment.models.transformer import dummy_inputs
from alignment.sharding import DEFAULT_RULES, make_mesh, param_shardings
from alignment.train.state import abstract_params
from tests import REPO

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(base, [ft0, ft1, ft2]) Orbax checkpoints of the tiny model."""
    return make_demo_checkpoints(str(tmp_path_factory.mktemp("demo")), CONFIG, seed=3)


def read_all(path) -> dict[str, np.ndarray]:
    """Every params tensor of a checkpoint as float64 numpy, by name ('layers/q_proj', ...)."""
    source = open_source(str(path))
    try:
        return {n: source.read(n, None).astype(np.float64) for n in source.tensors}
    finally:
        source.close()


def load_on_mesh(path, config=CONFIG):
    """The merged params as a later stage loads them (`init_from`): sharded over an 8-device mesh."""
    boxed = abstract_params(Transformer(config), dummy_inputs())
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params = load_params(path, nn.meta.unbox(boxed), param_shardings(boxed, mesh, DEFAULT_RULES))
    flat = {k: v for k, v in params.items() if k != "layers"}
    flat.update({f"layers/{k}": v for k, v in params["layers"].items()})
    return {k: np.asarray(v, np.float64) for k, v in flat.items()}


def ref_model_stock(models, base):
    taus = [m - base for m in models]
    cos = np.mean([(x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum())
                   for i, x in enumerate(taus) for y in taus[i + 1:]])
    t = len(models) * cos / (1 + (len(models) - 1) * cos)
    return t * np.mean(models, axis=0) + (1 - t) * base


def test_orbax_model_stock_is_per_layer_and_loads_sharded(demo, tmp_path):
    base, models = demo
    summary = merge_checkpoints(models, "model_stock", base=base, output=str(tmp_path / "out"))
    assert summary["tensors"] == len(read_all(base))
    got = load_on_mesh(tmp_path / "out")
    b, ms = read_all(base), [read_all(m) for m in models]
    for name, value in b.items():
        if name.startswith("layers/"):
            want = np.stack([ref_model_stock([m[name][i] for m in ms], value[i]) for i in range(CONFIG.num_layers)])
        else:
            want = ref_model_stock([m[name] for m in ms], value)
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_weights_interpolated_over_depth(demo, tmp_path):
    _, models = demo
    merge_checkpoints(models[:2], "linear", output=str(tmp_path / "out"),
                      params=dict(weights=((1.0, 0.0), (0.0, 1.0))))
    got, a, b = read_all(tmp_path / "out"), read_all(models[0]), read_all(models[1])
    np.testing.assert_allclose(got["embed"], a["embed"], rtol=1e-6)  # depth 0: first model only
    np.testing.assert_allclose(got["lm_head"], b["lm_head"], rtol=1e-6)  # depth 1: second model only
    for layer, wa in enumerate([1.0, 0.5, 0.0]):  # 3 layers at depths 0, 1/2, 1
        want = wa * a["layers/up_proj"][layer] + (1 - wa) * b["layers/up_proj"][layer]
        np.testing.assert_allclose(got["layers/up_proj"][layer], want, rtol=1e-6)


def test_hf_and_orbax_paths_agree(demo, tmp_path):
    base, models = demo
    hf_dirs = []
    for path in [base, *models]:
        params = {k: v.astype(np.float32) for k, v in load_on_mesh(path).items()}
        tree = {k: v for k, v in params.items() if "/" not in k}
        tree["layers"] = {k.split("/")[1]: v for k, v in params.items() if "/" in k}
        hf_dirs.append(str(tmp_path / f"hf-{os.path.basename(path)}"))
        save_hf_checkpoint(hf_dirs[-1], CONFIG, tree)
    kwargs = dict(params=dict(density=0.4, lam=1.3))
    merge_checkpoints(models, "ties", base=base, output=str(tmp_path / "o2o"), hf_output=str(tmp_path / "o2h"),
                      model_config=CONFIG, **kwargs)
    merge_checkpoints(hf_dirs[1:], "ties", base=hf_dirs[0], hf_output=str(tmp_path / "h2h"), **kwargs)
    merge_checkpoints(hf_dirs[1:], "ties", base=hf_dirs[0], output=str(tmp_path / "h2o"), **kwargs)
    # Mapped safetensors and Orbax reads side by side in one merge.
    merge_checkpoints([hf_dirs[1], models[1], hf_dirs[3]], "ties", base=base, output=str(tmp_path / "mixed"), **kwargs)
    want = read_all(tmp_path / "o2o")
    for other in ("o2h", "h2h", "h2o", "mixed"):
        got = read_all(tmp_path / other)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7, err_msg=f"{other} {name}")
    cfg, _ = load_hf_checkpoint(str(tmp_path / "h2h"))
    assert cfg.num_layers == CONFIG.num_layers


def ref_ties(models, base, density, lam=1.0):
    """TIES in float64 on one tensor, as mergekit: keep each task vector's max(1, int(density * n)) largest
    magnitudes, elect the sign of the sum (+ where it is 0), average the agreeing entries."""
    taus = []
    for m in models:
        tau = m - base
        k = max(1, int(density * tau.size))
        threshold = np.sort(np.abs(tau).ravel())[::-1][k - 1]
        taus.append(np.where(np.abs(tau) >= threshold, tau, 0.0))
    taus = np.stack(taus)
    agree = np.sign(taus) == np.where(taus.sum(0) >= 0, 1.0, -1.0)
    count = agree.sum(0)
    return base + lam * np.where(count > 0, (taus * agree).sum(0) / np.maximum(count, 1), 0.0)


def test_ties_trims_each_layer_of_a_stacked_tensor(demo, tmp_path):
    base, models = demo
    merge_checkpoints(models, "ties", output=str(tmp_path / "whole"), base=base, params=dict(density=0.3, lam=1.2))
    whole = read_all(tmp_path / "whole")
    b, ms = read_all(base), [read_all(m) for m in models]
    for name, value in b.items():
        if name.startswith("layers/"):  # per layer, as mergekit: each layer keeps its own top 30%
            want = np.stack([ref_ties([m[name][i] for m in ms], value[i], 0.3, 1.2) for i in range(CONFIG.num_layers)])
        else:
            want = ref_ties([m[name] for m in ms], value, 0.3, 1.2)
        np.testing.assert_allclose(whole[name], want, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "model_stock"])
def test_merge_on_the_mesh_equals_host(demo, tmp_path, method):
    base, models = demo
    kwargs = dict(base=base, params=dict(density=0.5) if "ties" in method else {})
    merge_checkpoints(models, method, output=str(tmp_path / "host"), shard_min_elements=0, **kwargs)
    merge_checkpoints(models, method, output=str(tmp_path / "mesh"), shard_min_elements=1, **kwargs)
    host, mesh = read_all(tmp_path / "host"), read_all(tmp_path / "mesh")
    for name in host:
        np.testing.assert_allclose(mesh[name], host[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_units_run_largest_first_within_the_budget():
    costs = {"a": 6, "b": 6, "c": 2, "d": 2, "e": 9, "f": 12}  # f is over the budget of 10: it runs alone
    lock, running, started, over = threading.Lock(), [], [], []

    def work(unit):
        with lock:
            running.append(costs[unit])
            started.append(unit)
            if len(running) > 1 and sum(running) > 10:
                over.append(list(running))
        time.sleep(0.05)
        with lock:
            running.remove(costs[unit])

    streaming._run_in_budget(list(costs), costs.get, work, streaming._Budget(10), workers=2)
    assert started[0] == "f" and sorted(started) == sorted(costs) and not over
    assert started.index("c") < started.index("b")  # while a (6) runs, b (6) waits and a free thread takes c (2)


def test_a_failing_unit_stops_the_others():
    started = []

    def work(unit):
        started.append(unit)
        if unit == 3:
            raise RuntimeError("unit 3 failed")
        time.sleep(0.01)

    with pytest.raises(RuntimeError, match="unit 3 failed"):
        streaming._run_in_budget(list(range(40)), lambda unit: 40 - unit, work, streaming._Budget(100), workers=2)
    assert len(started) < 10


def test_orbax_output_with_a_budget_smaller_than_any_tensor_finishes(demo, tmp_path):
    """Every leaf then waits for the budget alone; the one holding it must still get a thread for its next block."""
    base, models = demo
    done = []
    worker = threading.Thread(target=lambda: done.append(merge_checkpoints(
        models, "ties", base=base, output=str(tmp_path / "out"), memory_budget_bytes=1)), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert done, "the Orbax merge deadlocked: leaves waiting for the memory budget starved its holder of threads"
    want = read_all(tmp_path / "out")
    merge_checkpoints(models, "ties", base=base, output=str(tmp_path / "ref"))
    for name, value in read_all(tmp_path / "ref").items():
        np.testing.assert_array_equal(want[name], value, err_msg=name)


def test_orbax_output_is_stored_one_layer_per_chunk(demo, tmp_path):
    _, models = demo
    merge_checkpoints(models, "linear", output=str(tmp_path / "out"))
    source = open_source(str(tmp_path / "out"))
    try:
        assert source.layers_per_chunk("layers/up_proj") == 1
    finally:
        source.close()


def test_dare_seed_reproducible_and_independent_of_workers(demo, tmp_path):
    base, models = demo
    run = lambda name, seed, workers: read_all(merge_checkpoints(
        models, "dare_ties", base=base, hf_output=str(tmp_path / name), model_config=CONFIG, seed=seed,
        workers=workers, params=dict(density=0.5))["hf_output"])
    first, again, other = run("a", 7, 1), run("b", 7, 2), run("c", 8, 2)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    assert not np.array_equal(first["layers/up_proj"], other["layers/up_proj"])


# ----------------------------------------------------------------------------- bad input


def no_output_left(parent, name):
    return not any(entry == name or entry.startswith(f".{name}.") for entry in os.listdir(parent))


def test_different_vocab_fails_before_writing(demo, tmp_path):
    base, models = demo
    other = str(tmp_path / "other")
    save_params(other, random_params(dataclasses.replace(CONFIG, vocab_size=80), np.random.default_rng(0)))
    with pytest.raises(ValueError, match=r"(?s)embed: .*\[64, 32\].*\[80, 32\].*lm_head"):
        merge_checkpoints([models[0], other], "linear", output=str(tmp_path / "out"))
    assert no_output_left(tmp_path, "out")


def test_different_dtype_is_named(demo, tmp_path):
    _, models = demo
    params = jax.tree.map(lambda x: x.astype(np.float16), random_params(CONFIG, np.random.default_rng(0)))
    save_params(str(tmp_path / "half"), params)
    with pytest.raises(ValueError, match="float32.*float16"):
        merge_checkpoints([models[0], str(tmp_path / "half")], "linear", output=str(tmp_path / "out"))


def test_existing_output_refused_unless_overwrite(demo, tmp_path):
    _, models = demo
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="exists: pass overwrite=True"):  # launch prints it as one line
        merge_checkpoints(models, "linear", output=str(out))
    assert (out / "keep.txt").exists()
    merge_checkpoints(models, "linear", output=str(out), overwrite=True)
    assert not (out / "keep.txt").exists() and "layers/q_proj" in read_all(out)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "model_stock"])
def test_missing_base_is_a_clear_error(demo, tmp_path, method):
    with pytest.raises(ValueError, match="set the base"):
        merge_checkpoints(demo[1], method, output=str(tmp_path / "out"))


def test_nan_input_is_reported_and_nothing_written(demo, tmp_path):
    base, models = demo
    params = random_params(CONFIG, np.random.default_rng(1))
    params["layers"]["v_proj"][1, 3, 0, 2] = np.nan
    save_params(str(tmp_path / "nan"), params)
    with pytest.raises(ValueError, match=r"nan\).*layers/v_proj.*NaN or Inf \(first at index \(1, 3, 0, 2\)\)"):
        merge_checkpoints([models[0], str(tmp_path / "nan")], "ties", base=base, output=str(tmp_path / "out"),
                          hf_output=str(tmp_path / "hf"), model_config=CONFIG)
    assert no_output_left(tmp_path, "out") and no_output_left(tmp_path, "hf")


@pytest.mark.parametrize("outputs", [("output",), ("hf_output",), ("output", "hf_output")])
def test_interrupted_merge_leaves_no_partial_output(demo, tmp_path, monkeypatch, outputs):
    base, models = demo
    calls = []
    real = streaming.merge_pieces

    def interrupt_on_fifth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(streaming, "merge_pieces", interrupt_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        merge_checkpoints(models, "linear", model_config=CONFIG, workers=1,
                          **{o: str(tmp_path / o) for o in outputs})
    assert all(no_output_left(tmp_path, o) for o in outputs)


# ----------------------------------------------------------------------------- stage


def merge_config(**merge_fields) -> ml_collections.ConfigDict:
    c = config_lib.load_config_file(os.path.join(REPO, "configs", "merge.py"))
    c.merge.update(merge_fields)
    return c


def test_stage_demo_by_default_and_dry_run(tmp_path):
    from alignment import stages
    from alignment.launch import dry_run

    c = merge_config(method="ties")
    c.merge.params.density = 0.5
    stages.check(c)
    assert "parameters:" in dry_run(c)
    summary = stages.run("merge", c, str(tmp_path))  # no models given: the offline demo
    assert summary["method"] == "ties" and summary["reloaded_on_mesh"]
    assert json.load(open(tmp_path / "summary.json"))["method"] == "ties"
    with pytest.raises(ValueError, match="config.merge.base is set but config.merge.models is empty"):
        stages.run("merge", merge_config(base=str(tmp_path)), str(tmp_path / "x"))
