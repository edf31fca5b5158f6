"""Imports flow one way: launch -> stages -> (rl, pas, eval, data, algorithms, generation, rewards, merge) -> train
-> models/kernels. The package's source is walked with `ast` (nothing of the project is imported, so this runs in
well under a second); every import counts, lazy ones inside functions included, and so does
`importlib.import_module("...")` with a literal name.

Rules:
- a module imports only modules of its own layer or a lower one (LAYERS, highest layer first);
- among the peer packages of layer 3, the package-level import graph has no cycle;
- no cycle of modules anywhere;
- an import the walk cannot resolve (`import_module(some_variable)`) is only allowed in the stages and above;
- every imported project module exists (a moved module leaves no stale importer behind).
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Each top-level package and its folder, as setup.py installs them (`kernels` is Hugging Face's package name).
PACKAGE_DIRS = {"alignment": "alignment", "alignment_kernels": "kernels"}

# Layer of each module prefix, highest first; a module's layer is that of its longest listed prefix.
LAYERS = {
    5: ("alignment.launch", "alignment.serve", "alignment.pas.__main__", "alignment.merge.__main__"),
    4: ("alignment.stages",),
    3: ("alignment.rl", "alignment.pas", "alignment.eval", "alignment.data", "alignment.algorithms",
        "alignment.generation", "alignment.rewards", "alignment.merge", "alignment.synth"),
    2: ("alignment.train", "alignment.checkpoint"),
    1: ("alignment.models", "alignment.sharding", "alignment.config", "alignment_kernels"),
}
LAYER_NAMES = {5: "entry points", 4: "stages", 3: "peers", 2: "train", 1: "models/kernels"}
PREFIX_LAYER = {prefix: layer for layer, prefixes in LAYERS.items() for prefix in prefixes}
STAGES_LAYER, PEER_LAYER = 4, 3

# Known violations being removed right now: (importing file, imported module or DYNAMIC) -> why it is listed. An
# entry that no longer occurs fails the test, so it is deleted as soon as its violation is gone.
DYNAMIC = "<dynamic import_module>"
EXPECTED: dict = {}


def _module_files():
    """{module name: path} for every .py file of the project's packages."""
    files = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = (package, *path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    return files


MODULES = _module_files()


def _is_package(path):
    return path.name == "__init__.py"


def _resolve_relative(module, path, level, name):
    """The absolute module named by `from <level dots><name> import ...` inside `module`."""
    package = module.split(".") if _is_package(path) else module.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _is_import_module_call(node):
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return name in ("import_module", "__import__") and bool(node.args)


def _imports(module, path):
    """[(line, imported module name or DYNAMIC)] for every import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(module, path, node.level, node.module) if node.level else node.module
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                # `from package import submodule` imports the submodule; `from module import name` the module.
                found.append((node.lineno, submodule if submodule in MODULES else base))
        elif isinstance(node, ast.Call) and _is_import_module_call(node):
            arg = node.args[0]
            literal = isinstance(arg, ast.Constant) and isinstance(arg.value, str)
            found.append((node.lineno, arg.value if literal else DYNAMIC))
    return [(line, name) for line, name in found if name == DYNAMIC or name.split(".")[0] in PACKAGE_DIRS]


EDGES = [(src, line, dst) for src, path in MODULES.items() for line, dst in _imports(src, path)]


def _where(src, line):
    return f"{MODULES[src].relative_to(ROOT)}:{line}"


def layer_of(module):
    """The layer of a project module; the bare `alignment` package (empty) sits at the bottom."""
    if module == "alignment":
        return 1
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in PREFIX_LAYER:
            return PREFIX_LAYER[prefix]
    raise KeyError(module)


def _peer_package(module):
    """alignment.eval for alignment.eval.runner; None for a module outside layer 3."""
    return ".".join(module.split(".")[:2]) if layer_of(module) == PEER_LAYER else None


def _describe(module):
    layer = layer_of(module)
    return f"{module} (layer {layer}, {LAYER_NAMES[layer]})"


def _components(graph):
    """The strongly connected components of `graph` ({node: successors}) that hold a cycle, as sets (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _cycle_in(graph, component):
    """A shortest cycle through the component's smallest node, by breadth-first search inside the component."""
    start = min(component)
    parents, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for node in frontier:
            for succ in sorted(graph.get(node, ())):
                if succ == start:
                    path = [node]
                    while parents[path[-1]] is not None:
                        path.append(parents[path[-1]])
                    return [start] + path[::-1][1:] + [start] if node != start else [start, start]
                if succ in component and succ not in parents:
                    parents[succ] = node
                    nxt.append(succ)
        frontier = nxt
    raise AssertionError(f"no cycle found in component {sorted(component)}")


def _graph(edges):
    graph = {}
    for src, _, dst in edges:
        graph.setdefault(src, set()).add(dst)
    return graph


def _cycle_report(graph, component, witness):
    """A shortest cycle of the component, then every import between its members (each one could break it)."""
    cycle = _cycle_in(graph, component)
    inside = sorted((a, b) for a in component for b in graph.get(a, ()) if b in component)
    return (" -> ".join(cycle) + "; the imports among " + ", ".join(sorted(component)) + ":\n    "
            + "\n    ".join(f"{witness[(a, b)]}: {a} imports {b}" for a, b in inside))


def _check_expected(found):
    """Drops the allow-listed violations from `found` ({key: message}); a listed one that is gone is a failure."""
    stale = [f"{key} is allow-listed ({why}) but no longer occurs: delete it from EXPECTED in tests/test_layers.py"
             for key, why in EXPECTED.items() if key not in found]
    return [message for key, message in sorted(found.items()) if key not in EXPECTED] + stale


def test_every_module_has_a_layer():
    unplaced = [f"{path.relative_to(ROOT)} ({module})" for module, path in MODULES.items()
                if module != "alignment" and not any(module == p or module.startswith(p + ".") for p in PREFIX_LAYER)]
    assert not unplaced, "modules with no layer (add their package to LAYERS in tests/test_layers.py):\n  " + \
        "\n  ".join(unplaced)


def test_every_imported_project_module_exists():
    missing = [f"{_where(src, line)}: imports {dst}, which is no module of the project"
               for src, line, dst in EDGES if dst != DYNAMIC and dst not in MODULES and dst not in PACKAGE_DIRS]
    assert not missing, "\n".join(missing)


def test_no_import_runs_up_the_layers():
    found = {}
    for src, line, dst in EDGES:
        key = (str(MODULES[src].relative_to(ROOT)), dst)
        if dst == DYNAMIC:
            if layer_of(src) < STAGES_LAYER:
                found[key] = (f"{_where(src, line)}: {_describe(src)} imports a module named at run time, which this "
                              "test cannot check; below the stages, name the module in an import statement")
        elif dst in MODULES and layer_of(dst) > layer_of(src):
            found[key] = f"{_where(src, line)}: {_describe(src)} imports {_describe(dst)}, a higher layer"
    problems = _check_expected(found)
    assert not problems, "imports that run up the layer order:\n" + "\n".join(problems)


def test_peer_packages_form_no_cycle():
    witness, edges = {}, []
    for src, line, dst in EDGES:
        if dst == DYNAMIC or dst not in MODULES:
            continue
        a, b = _peer_package(src), _peer_package(dst)
        if a and b and a != b:
            witness.setdefault((a, b), _where(src, line))
            edges.append((a, line, b))
    graph = _graph(edges)
    components = _components(graph)
    assert not components, "cycles among the peer packages of layer 3:\n  " + "\n  ".join(
        _cycle_report(graph, component, witness) for component in components)


def test_no_module_import_cycle():
    edges = [(src, line, dst) for src, line, dst in EDGES if dst in MODULES]
    witness = {}
    for src, line, dst in edges:
        witness.setdefault((src, dst), _where(src, line))
    graph = _graph(edges)
    components = _components(graph)
    assert not components, "module import cycles:\n  " + "\n  ".join(
        _cycle_report(graph, component, witness) for component in components)


@pytest.mark.parametrize("source, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c", "a"]]),
    ({"a": {"a"}}, [["a", "a"]]),
    ({"a": {"b"}, "b": {"c"}}, []),
])
def test_cycle_finder(source, expected):
    """The checker itself: a 3-cycle with a tail, a self-import, and a chain with no cycle."""
    assert [_cycle_in(source, component) for component in _components(source)] == expected


def test_relative_imports_resolve():
    package, module = ROOT / "alignment/eval/__init__.py", ROOT / "alignment/eval/runner.py"
    assert _resolve_relative("alignment.eval", package, 1, "judge") == "alignment.eval.judge"
    assert _resolve_relative("alignment.eval.runner", module, 1, "judge") == "alignment.eval.judge"
    assert _resolve_relative("alignment.eval.runner", module, 2, "rewards") == "alignment.rewards"
    assert _resolve_relative("alignment.eval.runner", module, 1, None) == "alignment.eval"


def test_imports_counts_lazy_relative_and_named_imports(tmp_path):
    path = tmp_path / "quality.py"
    path.write_text("import importlib\n"
                    "from . import data\n"
                    "def score(name):\n"
                    "    from ..rewards.registry import REWARDS\n"
                    "    importlib.import_module('alignment.stages.rm')\n"
                    "    return importlib.import_module(name)\n")
    assert sorted(_imports("alignment.pas.quality", path), key=str) == [
        (2, "alignment.pas.data"), (4, "alignment.rewards.registry"), (5, "alignment.stages.rm"), (6, DYNAMIC)]


def test_layers_of_entry_points_inside_peer_packages_and_the_kernels():
    assert [layer_of(m) for m in ("alignment.pas.__main__", "alignment.pas.quality", "alignment.stages.rm",
                                  "alignment.train.runtime", "alignment_kernels.attention.api", "alignment")] == [
        5, 3, 4, 2, 1, 1]
    assert MODULES["alignment_kernels.attention.api"] == ROOT / "kernels" / "attention" / "api.py"
