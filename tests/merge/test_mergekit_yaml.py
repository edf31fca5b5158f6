"""Parity with mergekit: the YAML that made each golden output (tests/fixtures/make_mergekit_golden.py runs
mergekit 0.1.5 itself) fed to `python -m alignment.merge` gives the same tensors (float32, 1e-6 relative to
each tensor's largest entry); the YAML fields' checks and errors. JAX-free: HF in, HF out."""
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from alignment.merge.__main__ import main
from alignment.merge.mergekit_yaml import evaluate, load_mergekit_yaml, position
from tests import REPO, FIXTURES

META = json.loads((FIXTURES / "mergekit_golden.json").read_text())


def unflatten(flat: np.ndarray) -> dict[str, np.ndarray]:
    """HF tensor name -> array, from the fixture's concatenation (the order of META['tensors'])."""
    out, start = {}, 0
    for name, shape in META["tensors"]:
        size = int(np.prod(shape))
        out[name] = flat[start:start + size].reshape(shape)
        start += size
    return out


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """(directory holding the input models as HF checkpoints, {case: {tensor: mergekit's output}})."""
    root = tmp_path_factory.mktemp("mergekit")
    with np.load(FIXTURES / "mergekit_golden.npz") as arrays:
        for model in META["models"]:
            os.makedirs(root / model)
            safetensors.numpy.save_file(unflatten(arrays[f"input/{model}"]), str(root / model / "model.safetensors"),
                                        metadata={"format": "pt"})
            (root / model / "config.json").write_text(json.dumps(META["config"]))
        outputs = {case: unflatten(arrays[f"output/{case}"]) for case in META["cases"]}
    return root, outputs


def run_yaml(root, text, out, *args):
    """`python -m alignment.merge` (in process) on YAML `text`, run from the inputs' directory as mergekit was."""
    config = pathlib.Path(out).parent / f"{pathlib.Path(out).name}.yml"
    config.write_text(text)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        main([str(config), str(out), *args])
    finally:
        os.chdir(cwd)
    return safetensors.numpy.load_file(os.path.join(out, "model.safetensors"))


@pytest.mark.parametrize("case", sorted(META["cases"]))
def test_same_yaml_gives_mergekits_tensors(golden, tmp_path, case):
    root, outputs = golden
    got = run_yaml(root, META["cases"][case], tmp_path / case, "--seed", str(META["dare_seed"]))
    assert set(got) == set(outputs[case])
    for name, want in outputs[case].items():
        assert got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-6 * np.abs(want).max(), err_msg=name)


def test_the_golden_cases_exercise_what_differed():
    """Model Stock's negative mean cosine extrapolates (t < 0: outside the models' span; the project clamped it to
    the base), and TIES at density 0.35 keeps int(0.35 n) entries, which is not round(0.35 n) for these sizes."""
    with np.load(FIXTURES / "mergekit_golden.npz") as arrays:
        base, ft0, neg0 = (unflatten(arrays[f"input/{m}"]) for m in ("base", "ft0", "neg0"))
        stock = unflatten(arrays["output/model_stock_negative_2"])
    name = "model.layers.0.mlp.up_proj.weight"
    mean_tau = (ft0[name] - base[name] + neg0[name] - base[name]) / 2
    t = float(np.sum((stock[name] - base[name]) * mean_tau) / np.sum(mean_tau * mean_tau))
    assert t < 0
    sizes = {int(np.prod(shape)) for _, shape in META["tensors"]}
    assert any(int(0.35 * n) != round(0.35 * n) for n in sizes)


def test_out_dtype_and_tokenizer_copy(golden, tmp_path):
    """out_dtype is the written dtype (mergekit's float32 result rounded once); the tokenizer files of the base go
    with the output, as mergekit copies them."""
    root, outputs = golden
    inputs = tmp_path / "inputs"
    shutil.copytree(root, inputs)
    (inputs / "base" / "tokenizer.json").write_text('{"version": "1.0"}')
    (inputs / "base" / "tokenizer_config.json").write_text("{}")
    text = META["cases"]["model_stock"].replace("dtype: float32", "out_dtype: bfloat16")
    got = run_yaml(inputs, text, tmp_path / "out")
    for name, want in outputs["model_stock"].items():
        rounded = want.astype(ml_dtypes.bfloat16).astype(np.float32)
        close = np.isclose(got[name].astype(np.float32), rounded, rtol=0, atol=0)
        # a value within float32 rounding of a bfloat16 midpoint may round either way
        assert close.mean() > 0.95, name
        np.testing.assert_allclose(got[name].astype(np.float32), want, rtol=2**-7, err_msg=name)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert (tmp_path / "out" / "tokenizer_config.json").exists()


def test_a_parameter_mergekit_ignores_is_ignored_with_a_warning(golden, tmp_path, caplog):
    root, outputs = golden
    text = META["cases"]["model_stock"].replace("dtype: float32", "parameters: {weight: 0.5}\ndtype: float32")
    with caplog.at_level(logging.WARNING):
        got = run_yaml(root, text, tmp_path / "out")
    assert "model_stock takes no parameter 'weight'" in caplog.text
    np.testing.assert_array_equal(got["lm_head.weight"], run_yaml(root, META["cases"]["model_stock"],
                                                                  tmp_path / "plain")["lm_head.weight"])


def test_gradients_and_filters_resolve_as_mergekit():
    assert [position(i, 5) for i in (None, 0, 2, 4)] == [0.0, 0.0, 0.5, 1.0]
    assert position(0, 1) == 1.0  # mergekit's position of the only layer
    assert evaluate([0.0, 1.0, 0.5], "x", 0.75) == pytest.approx(0.75)
    assert evaluate([True, False], "x", 0.9) is True  # not numbers: a step, not an interpolation
    conditional = [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.3}]
    assert evaluate(conditional, "model.layers.1.mlp.up_proj.weight", 0.5) == 0.5
    assert evaluate(conditional, "model.embed_tokens.weight", 0.5) == 0.3
    assert evaluate([{"filter": "mlp", "value": 1.0}], "lm_head.weight", 0.0) is None  # the next level decides


BAD = {
    "modules": ("modules: {text: {models: [{model: ft0}]}}\nmerge_method: linear", "modules: per-module"),
    "method": ("merge_method: della\nbase_model: base\nmodels: [{model: ft0}]", "merge_method: 'della' is not"),
    "typo": ("merge_methd: linear\nmodels: [{model: ft0}]", "merge_methd: not a field.*'merge_method'"),
    "weight": ("merge_method: ties\nbase_model: base\nmodels: [{model: ft0}, {model: ft1, parameters: {weight: 1}}]",
               r"models\[0\] \(ft0\): parameter 'weight' is required by ties"),
    "filter_wise": ("merge_method: model_stock\nbase_model: base\nmodels: [{model: ft0}, {model: ft1}]\n"
                    "parameters: {filter_wise: true}", "filter_wise"),
    "hub": ("merge_method: linear\nmodels: [{model: mistralai/Mistral-7B-v0.1, parameters: {weight: 1}}]",
            "models\\[0\\].model: 'mistralai/Mistral-7B-v0.1' is not a local HF model directory"),
    "lora": ("merge_method: linear\nmodels: [{model: ft0+adapter, parameters: {weight: 1}}]", "LoRA"),
    "layers": ("merge_method: slerp\nbase_model: ft0\nparameters: {t: 0.5}\nslices:\n  - sources:\n"
               "      - {model: ft0, layer_range: [0, 2]}\n      - {model: ft1, layer_range: [0, 2]}",
               r"slices\[0\].sources\[0\].layer_range: \[0, 2\] is not all"),
    "density": ("merge_method: ties\nbase_model: base\nmodels: [{model: ft0, parameters: {weight: 1, density: 0}}]",
                r"models\[0\].parameters.density: 0 must lie in \(0.0, 1\]"),
    "type": ("merge_method: ties\nbase_model: base\nmodels: [{model: ft0, parameters: {weight: high}}]",
             r"models\[0\].parameters.weight: 'high' is not a number"),
    "filter": ("merge_method: linear\nmodels: [{model: ft0, parameters: {weight: [{filter: mpl, value: 1}, "
               "{value: 2}]}}]", r"filters \['mpl'\] are part of no tensor name.*model.layers.N.mlp.up_proj.weight"),
    "tokenizer": ("merge_method: linear\nmodels: [{model: ft0, parameters: {weight: 1}}]\n"
                  "tokenizer: {source: base}", "tokenizer: not supported"),
    "dtype": ("merge_method: linear\nmodels: [{model: ft0, parameters: {weight: 1}}]\nout_dtype: int8",
              "out_dtype: 'int8'"),
    "slerp": ("merge_method: slerp\nbase_model: ft0\nmodels: [{model: ft1}, {model: ft2}]\nparameters: {t: 0.5}",
              "slerp interpolates the base and one other model"),
    "yaml": ("merge_method: [linear", "not valid YAML"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_yaml_is_one_clear_error_naming_the_field(golden, tmp_path, case):
    root, _ = golden
    text, message = BAD[case]
    with pytest.raises(SystemExit) as exit:
        run_yaml(root, text, tmp_path / "out")
    assert str(exit.value).startswith("error: ") and str(tmp_path / "out.yml") in str(exit.value)
    assert re.search(message, str(exit.value)), exit.value
    assert not (tmp_path / "out").exists()


def test_command_line_entry(golden, tmp_path):
    """The module entry point end to end, in its own process: no JAX import, one-line errors."""
    root, outputs = golden
    config = tmp_path / "ties.yml"
    config.write_text(META["cases"]["ties"])
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = [sys.executable, "-c", "import sys, alignment.merge.__main__ as m; m.main(); "
               "assert not any(n.startswith(('jax', 'orbax')) for n in sys.modules), 'JAX imported'",
               str(config), str(tmp_path / "out")]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["method"] == "ties"
    got = safetensors.numpy.load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, want in outputs["ties"].items():
        np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-6 * np.abs(want).max(), err_msg=name)
    again = subprocess.run([sys.executable, "-m", "alignment.merge", str(config), str(tmp_path / "out")],
                           cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert f"error: output {tmp_path / 'out'} exists: pass overwrite=True" in again.stderr
    done = subprocess.run([sys.executable, "-m", "alignment.merge", str(config), str(tmp_path / "out"),
                           "--overwrite"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_plan_maps_the_yaml_to_our_merge(golden, monkeypatch):
    """What each YAML form becomes: the base out of the models (task vectors), SLERP's base first, linear's base
    one more input."""
    root, _ = golden
    monkeypatch.chdir(root)
    plans = {}
    for case in ("task_arithmetic", "slerp_base_not_listed", "linear_with_base_unnormalized", "ties_options"):
        path = root / f"{case}.yml"
        path.write_text(META["cases"][case])
        plans[case] = load_mergekit_yaml(str(path))
    assert (plans["task_arithmetic"].models, plans["task_arithmetic"].base) == (("ft0", "ft1", "neg0"), "base")
    assert (plans["slerp_base_not_listed"].models, plans["slerp_base_not_listed"].base) == (("ft2", "neg1"), "")
    assert plans["linear_with_base_unnormalized"].models == ("ft0", "ft1", "base")
    p = plans["ties_options"].spec.resolve("layers/up_proj", 1, 3)
    assert p.weights == (1.0, -0.5, 0.8) and p.densities == pytest.approx((0.2, 0.6, 0.7))
    assert (p.rescale, p.normalize, p.lam) == ("l1", False, 1.3)
    assert plans["ties_options"].spec.resolve("layers/q_proj", 0, 3).densities == pytest.approx((0.2, 0.3, 0.5))


def test_stage_runs_a_mergekit_yaml(golden, tmp_path, monkeypatch):
    """--config.mergekit_yaml=FILE: the merge stage runs the YAML (HF output equal to mergekit's; the Orbax
    checkpoint later stages start from holds the same numbers); the workdir's output is not replaced twice."""
    from alignment import config as config_lib
    from alignment.merge.checkpoint_io import open_source
    from alignment import stages

    root, outputs = golden
    (tmp_path / "stock.yml").write_text(META["cases"]["model_stock_negative_3"])
    monkeypatch.chdir(root)
    c = config_lib.load_config_file(str(REPO / "configs" / "merge.py"))
    c.mergekit_yaml = str(tmp_path / "stock.yml")
    c.merge.hf_output = str(tmp_path / "hf")
    summary = stages.run("merge", c, str(tmp_path / "work"))
    assert summary["method"] == "model_stock" and summary["models"] == ["ft0", "neg0", "neg1"]
    got = safetensors.numpy.load_file(str(tmp_path / "hf" / "model.safetensors"))
    for name, want in outputs["model_stock_negative_3"].items():
        np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-6 * np.abs(want).max(), err_msg=name)
    orbax, hf_dir = open_source(str(tmp_path / "work" / "merged")), open_source(str(tmp_path / "hf"))
    for name in hf_dir.tensors:
        np.testing.assert_array_equal(orbax.read(name, None), hf_dir.read(name, None), err_msg=name)
    orbax.close()
    hf_dir.close()
    c.merge.hf_output = ""
    with pytest.raises(ValueError, match="merged exists: pass overwrite=True"):
        stages.run("merge", c, str(tmp_path / "work"))
