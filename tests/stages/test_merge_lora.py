"""The merge stage reads a LoRA run as a task vector over its base: two LoRA SFT runs on one base merge to the same
weights as their `merge_lora` outputs, and to base + sum_i w_i * scale * A_i B_i computed in float64; a LoRA run on
another base, or a merge.base that is not the adapters' base, is a one-line error naming both paths."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from alignment import stages
from alignment.config import load_config_file
from alignment.merge import merge_checkpoints
from alignment.models import Transformer
from alignment.models.hf import load_hf_checkpoint, save_hf_checkpoint
from alignment.models.lora import LoraSpec
from alignment.models.transformer import dummy_inputs
from alignment.train import runtime
from alignment.train.adapters import merge_lora
from tests import persistent_compilation_cache
from tests.train.test_adapters import config as sft_lora_config, state_at

STEPS = 2


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """(base HF directory, [two LoRA SFT run workdirs on it], a LoRA run on another base)."""
    root = tmp_path_factory.mktemp("lora_runs")
    cache = persistent_compilation_cache(str(root / "jax_cache"))  # the three runs compile the same programs
    next(cache)
    model_cfg = runtime.model_config(sft_lora_config(STEPS))
    bases = [str(root / "base0"), str(root / "base1")]
    for seed, path in enumerate(bases):
        params = Transformer(model_cfg).init(jax.random.key(seed), *dummy_inputs())["params"]
        save_hf_checkpoint(path, model_cfg, jax.device_get(nn.meta.unbox(params)))
    runs = []
    for name, base, seed in (("a", bases[0], 0), ("b", bases[0], 1), ("other", bases[1], 0)):
        c = sft_lora_config(STEPS)
        c.init_from, c.seed = base, seed
        stages.run("sft", c, str(root / name))
        runs.append(str(root / name))
    yield bases[0], runs[:2], runs[2]
    next(cache, None)


def merge_config(models, method, base="", **params):
    c = load_config_file("configs/merge.py")
    c.merge.models, c.merge.base, c.merge.method = tuple(models), base, method
    c.merge.params.update(params)
    return c


def adapter_deltas(run):
    """{kernel name: scale * A B as float64, shaped like the kernel}, from the run's newest checkpoint."""
    info = json.load(open(os.path.join(run, "checkpoints", "lora.json")))
    scale = LoraSpec(**info["spec"]).scale
    adapters = state_at(run, STEPS)["params"]["lora"]["layers"]
    deltas = {}
    for name, ab in adapters.items():
        a, b = np.asarray(ab["a"], np.float64), np.asarray(ab["b"], np.float64)
        layers, rank = a.shape[0], a.shape[-1]
        delta = a.reshape(layers, -1, rank) @ b.reshape(layers, rank, -1)
        deltas[name] = scale * delta.reshape(a.shape[:-1] + b.shape[2:])
    return deltas


@pytest.mark.parametrize("method,params", [("task_arithmetic", dict(weights=(0.7, 0.5))),
                                           ("linear", dict(weights=(0.25, 0.75)))])
def test_lora_runs_merge_as_task_vectors(lora_runs, tmp_path, method, params):
    base, runs, _ = lora_runs
    given_base = base if method == "task_arithmetic" else ""
    config = merge_config(runs, method, base="", **params)  # task_arithmetic: the base defaults to the adapters'
    config.merge.hf_output = str(tmp_path / "stage_hf")
    stages.run("merge", config, str(tmp_path / "stage"))
    assert [p for p in os.listdir(tmp_path / "stage") if p.startswith(".lora-whole-")] == []  # scratch removed
    _, merged = load_hf_checkpoint(str(tmp_path / "stage_hf"))

    # The same merge of the merge_lora outputs, written by hand.
    whole = []
    for i, run in enumerate(runs):
        merge_lora(run, str(tmp_path / f"whole{i}"))
        whole.append(str(tmp_path / f"whole{i}"))
    merge_checkpoints(whole, method, base=given_base, hf_output=str(tmp_path / "by_hand"), params=params)
    _, by_hand = load_hf_checkpoint(str(tmp_path / "by_hand"))
    for got, want in zip(jax.tree.leaves(merged), jax.tree.leaves(by_hand)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)

    # Independent float64 reference: base + sum_i w_i * delta_i (task arithmetic), sum_i w_i (base + delta_i) (linear,
    # normalised by the weights' sum, 1 here).
    _, base_params = load_hf_checkpoint(base)
    deltas = [adapter_deltas(run) for run in runs]
    weights = params["weights"]
    assert set(deltas[0]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for name, delta in deltas[0].items():
        assert np.abs(delta).max() > 1e-4  # the adapters moved this kernel
        w0 = np.asarray(base_params["layers"][name], np.float64)
        want = w0 + sum(w * d[name] for w, d in zip(weights, deltas))
        np.testing.assert_allclose(np.asarray(merged["layers"][name]), want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(merged["embed"]), np.asarray(base_params["embed"]), rtol=0, atol=1e-6)


def test_lora_runs_on_other_bases_are_a_one_line_error(lora_runs, tmp_path):
    base, runs, other = lora_runs
    with pytest.raises(ValueError, match=r"^LoRA runs in config\.merge\.models have different bases: .*base0.*base1$"):
        stages.run("merge", merge_config([runs[0], other], "task_arithmetic"), str(tmp_path / "mixed"))
    other_base = os.path.join(os.path.dirname(base), "base1")
    with pytest.raises(ValueError, match=r"^config\.merge\.base=.*base1 is not the base of the LoRA runs .*base0"):
        stages.run("merge", merge_config(runs, "task_arithmetic", base=other_base), str(tmp_path / "wrong_base"))
    seeded = tmp_path / "seeded" / "checkpoints"  # a LoRA run started from the seed's random init: no base to name
    seeded.mkdir(parents=True)
    (seeded / "lora.json").write_text(json.dumps({"base": ""}))
    with pytest.raises(ValueError, match=r"lora\.json names no base .*config\.init_from"):
        stages.run("merge", merge_config([runs[0], str(seeded.parent)], "linear"), str(tmp_path / "seeded_merge"))
