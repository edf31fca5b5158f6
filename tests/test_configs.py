"""The shipped configs load from any working directory: `configs/` is installed as `alignment_configs`.

Config files import their siblings as `alignment_configs.<name>`, and `alignment.config.model_preset` and
`config_path` find files in the installed package, so nothing relies on the repository root being on `sys.path`.
The checks run fresh interpreters in an empty temporary directory; one of them also asks, from the repository
root, that the name `configs` stays free for other projects (the folder has no `__init__.py`).
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from alignment import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# Run in a temporary directory with the repository's configs folder as argv[1]: every config file of the
# repository loaded by its path and a stage's config checked by its stage (the others are the server's and the PAS
# CLI's), what `alignment_configs` and `config_path` resolve to.
LOAD_EVERY_CONFIG = """
import json, pathlib, sys
import alignment_configs.grpo
from alignment import config as config_lib, stages
folder = pathlib.Path(sys.argv[1])
loaded = {}
for path in sorted([*folder.glob("*.py"), *folder.glob("synth/*.py")]):
    config = config_lib.load_config_file(str(path))
    if "stage" in config:
        stages.check(config)
    loaded[path.relative_to(folder).with_suffix("").as_posix()] = config.get("stage")
print(json.dumps({
    "stages": sorted(stages.STAGES),
    "loaded": loaded,
    "grpo_module": alignment_configs.grpo.__file__,
    "shipped": {name: config_lib.config_path(name) for name in config_lib.shipped_configs()},
    "tiny_layers": config_lib.model_preset("tiny").num_layers,
}))
"""


def python(*args, cwd, env=None):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_every_config_loads_and_checks_from_another_directory(tmp_path):
    result = python("-c", LOAD_EVERY_CONFIG, str(CONFIGS), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    config_files = sorted(p.relative_to(CONFIGS).with_suffix("").as_posix()
                          for p in [*CONFIGS.glob("*.py"), *CONFIGS.glob("synth/*.py")])
    assert sorted(out["loaded"]) == config_files
    assert set(out["loaded"].values()) >= set(out["stages"]), f"a stage without a shipped config: {out['loaded']}"
    assert pathlib.Path(out["grpo_module"]).read_bytes() == (CONFIGS / "grpo.py").read_bytes()
    # Every file of configs/ is shipped, each under its own name (editable install: the file itself; plain
    # install: its copy in site-packages).
    in_repository = sorted(p.relative_to(CONFIGS).with_suffix("").as_posix() for p in CONFIGS.rglob("*.py"))
    assert sorted(out["shipped"]) == in_repository
    for name, path in out["shipped"].items():
        assert pathlib.Path(path).read_bytes() == (CONFIGS / f"{name}.py").read_bytes(), name
    assert out["tiny_layers"] == config_lib.model_preset("tiny").num_layers


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_launch_dry_run_takes_a_config_path_from_another_directory(tmp_path, relative):
    path = CONFIGS / "grpo.py"
    config = os.path.relpath(path, tmp_path) if relative else str(path)
    result = python("-m", "alignment.launch", f"--config={config}", "--dry_run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "parameters:" in result.stdout and "stage: grpo" in result.stdout, result.stdout


def test_config_importing_the_bare_configs_name_fails_in_one_line_naming_the_file(tmp_path):
    stale = tmp_path / "stale.py"
    stale.write_text("from configs import sft\n\n\ndef get_config():\n    return sft.get_config()\n")
    result = python("-m", "alignment.launch", f"--config={stale}", "--dry_run", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {stale}: No module named 'configs' (the shipped configs are imported as alignment_configs: "
        "from alignment_configs import sft)"], result.stderr


def test_regular_configs_package_later_on_path_wins_over_repository_folder(tmp_path):
    """From the repository root (first on sys.path) `import configs` reaches another project's regular package."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "__init__.py").write_text("")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    result = python("-c", "import importlib.util; print(importlib.util.find_spec('configs').origin)", cwd=REPO,
                    env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "configs" / "__init__.py")


def test_config_path_accepts_only_shipped_names():
    assert pathlib.Path(config_lib.config_path("models/tiny")).read_bytes() == (
        CONFIGS / "models" / "tiny.py").read_bytes()
    with pytest.raises(ValueError, match=r"no shipped config 'grpo.py'\. Did you mean 'grpo'\?"):
        config_lib.config_path("grpo.py")
    with pytest.raises(ValueError, match=r"no shipped config '\.\./setup'"):
        config_lib.config_path("../setup")
    with pytest.raises(ValueError, match=r"unknown model preset 'llama3_8'\. Did you mean 'llama3_8b'\?"):
        config_lib.model_preset("llama3_8")


def test_configs_folder_names_the_fix_when_the_package_is_not_installed(monkeypatch):
    monkeypatch.setattr(config_lib, "CONFIGS_PACKAGE", "alignment_configs_not_installed")
    with pytest.raises(FileNotFoundError, match=r"not installed: run pip install -e \. in the repository root"):
        config_lib.configs_folder()
