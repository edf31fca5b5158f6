"""The `kernels/` folder is imported as `alignment_kernels`; the name `kernels` stays Hugging Face's.

transformers (>= 5.25) imports Hugging Face's `kernels` package. Run from the repository root, where the current
directory is on `sys.path` (`python -m pytest`), a regular package in `./kernels/` would shadow it. Each check
runs a fresh interpreter in the repository root, as the README's test command does, and asks where the names
resolve (find_spec: nothing is executed).
"""
import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys

import pytest
from tests import REPO


WHERE = """
import importlib.util, json
def where(name):
    spec = importlib.util.find_spec(name)
    return spec and {"origin": spec.origin, "locations": list(spec.submodule_search_locations or [])}
print(json.dumps({name: where(name) for name in ["kernels", "alignment_kernels", "alignment_kernels.dispatch"]}))
"""


def resolve_in_repo_root(pythonpath=None):
    """{module name: {"origin", "locations"} or None} as a fresh interpreter in the repository root sees it."""
    env = dict(os.environ)
    if pythonpath is not None:  # PYTHONPATH entries come after the current directory on sys.path
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), *filter(None, [env.get("PYTHONPATH")])])
    out = subprocess.run([sys.executable, "-c", WHERE], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    return json.loads(out.stdout)


def assert_not_this_repository(spec):
    folder = REPO / "kernels"
    assert spec["origin"] is None or not pathlib.Path(spec["origin"]).is_relative_to(folder), spec
    assert str(folder) not in spec["locations"], spec


def test_alignment_kernels_is_this_repository_kernels_folder():
    spec = resolve_in_repo_root()["alignment_kernels.dispatch"]
    assert spec is not None, "alignment_kernels is not installed: run pip install -e . in the repository root"
    # Editable install: the file itself; plain install: a copy of it in site-packages.
    assert pathlib.Path(spec["origin"]).read_bytes() == (REPO / "kernels" / "dispatch.py").read_bytes(), spec


def test_regular_kernels_package_later_on_path_wins_over_repository_folder(tmp_path):
    """A stand-in for Hugging Face's package, placed after the repository root on sys.path."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    spec = resolve_in_repo_root(pythonpath=tmp_path)["kernels"]
    assert spec is not None and spec["origin"] == str(tmp_path / "kernels" / "__init__.py"), (
        f"`import kernels` from the repository root does not reach the regular package later on sys.path: {spec}")
    assert_not_this_repository(spec)


def test_hugging_face_kernels_is_what_kernels_imports_from_repository_root():
    try:
        distribution = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's `kernels` is not installed (transformers >= 5.25 installs it)")
    spec = resolve_in_repo_root()["kernels"]
    hugging_face = pathlib.Path(distribution.locate_file("kernels/__init__.py")).resolve()
    assert spec is not None and pathlib.Path(spec["origin"]).resolve() == hugging_face, spec
    assert_not_this_repository(spec)
