"""The static rollout engine (one batch decoded to its longest row, a dense KV cache of batch x (prompt + new)
slots) and the server over it (one request at a time), as they were before the continuous-batching engine
replaced them, for side-by-side benchmarks.

They are read from git at `REVISION` (the last commit with them) and imported as modules, so the baselines are
exactly the code that ran, not re-creations; this needs the repository's .git and still-compatible imports.
"""
from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys
import tempfile

REVISION = "9308b83"  # alignment/generation/engine.py before the continuous-batching engine
REPO = pathlib.Path(__file__).resolve().parents[1]


def _module_at_revision(path: str, name: str):
    if name in sys.modules:
        return sys.modules[name]
    source = subprocess.run(["git", "show", f"{REVISION}:{path}"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout
    file = pathlib.Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load():
    """The module `alignment.generation.engine` at REVISION (its `Engine` has the same constructor and generate)."""
    return _module_at_revision("alignment/generation/engine.py", "static_engine_at_revision")


def load_server():
    """The module `alignment.serve` at REVISION, its engine import bound to `load()`'s module: its `Service` runs
    one request at a time (a lock around `Engine.generate`)."""
    import alignment.generation.engine as current  # noqa: F401  (imported first, so it can be put back)

    engine, name = load(), "alignment.generation.engine"
    sys.modules[name] = engine  # what the old module's `from alignment.generation.engine import ...` finds
    try:
        return _module_at_revision("alignment/serve.py", "static_server_at_revision")
    finally:
        sys.modules[name] = current
