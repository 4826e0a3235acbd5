"""The package layout: imports inside edlm only go downward and never form a cycle.

Layers, lowest first; a module may import its own layer or lower ones. Lazy imports inside
functions count too: a lazy upward import is still an upward dependency. The checker reads a
source tree (the directory holding the `edlm` package), so its self-checks run it on a copy of
the package with an import planted in it.
"""

import ast
import shutil
from pathlib import Path

import pytest

import edlm

SRC_ROOT = Path(edlm.__file__).parent.parent  # the directory that holds the edlm package
LAYERS = [  # (module prefix, layer)
    ("edlm.errors", 0),
    ("edlm.config", 1), ("edlm.masks", 1), ("edlm.fusion", 1), ("edlm.drafter", 1), ("edlm.moe", 1), ("edlm.files", 1),
    ("edlm.vision", 1),
    ("edlm.testing", 1),
    ("edlm.decode", 2), ("edlm.embed", 2), ("edlm.aot", 2),
    ("edlm.model", 3),
    ("edlm.train", 4), ("edlm.serve", 4),
    ("edlm.recipes", 5),
    ("edlm.cli", 6),
]


def layer(module: str) -> int:
    for prefix, rank in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_module(node: ast.ImportFrom, importer: str, is_package: bool) -> str | None:
    """The absolute module an ImportFrom reads from (relative imports resolved), or None."""
    if not node.level:
        return node.module
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(root: Path = SRC_ROOT) -> dict[str, set[str]]:
    """edlm module -> the edlm modules it imports (at any depth of its code), for the tree at root."""
    paths = sorted((root / "edlm").rglob("*.py"))
    modules = {module_name(p, root) for p in paths}

    def ours(name: str | None) -> bool:
        return name is not None and (name == "edlm" or name.startswith("edlm."))

    graph = {}
    for path in paths:
        name = module_name(path, root)
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom):
                base = imported_module(node, name, path.name == "__init__.py")
                if ours(base):  # `from edlm.decode import rules` depends on edlm.decode.rules itself
                    found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if ours(a.name)}
        graph[name] = found - {name}
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a higher layer, and every import of the package root, as readable lines."""
    bad = []
    for mod, deps in sorted(graph.items()):
        if mod == "edlm" or mod.endswith("__main__"):
            continue  # the public API re-exports; `python -m` entry points sit on top
        bad += [f"{mod} imports the edlm package root; import the module itself" for d in deps if d == "edlm"]
        bad += [f"{mod} ({layer(mod)}) -> {d} ({layer(d)})" for d in sorted(deps - {"edlm"})
                if layer(d) > layer(mod)]
    return bad


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    graph = {m: {d for d in deps if d in graph} for m, deps in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for mod in sorted(graph):
        if mod not in state and (cycle := visit(mod, [mod])):
            return cycle
    return None


def test_every_module_has_a_layer_and_imports_only_downward():
    bad = upward_imports(imports())
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    cycle = import_cycle(imports())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.fixture()
def package_copy(tmp_path) -> Path:
    """A copy of edlm's source files under tmp_path: the real layer structure and real imports."""
    shutil.copytree(SRC_ROOT / "edlm", tmp_path / "edlm", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return tmp_path


def plant(root: Path, module: str, code: str) -> None:
    path = root / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    path.write_text((path.read_text() if path.exists() else "") + "\n\n" + code)


def test_a_clean_copy_passes(package_copy):
    graph = imports(package_copy)
    assert graph == imports()  # the copy reads exactly like the package it was taken from
    assert upward_imports(graph) == [] and import_cycle(graph) is None


@pytest.mark.parametrize(("low", "code", "found"), [
    # lazy, inside a function: a decode module reaching up to the server
    ("edlm.decode.rules", "def _serve_it():\n    from edlm.serve.app import create_app\n    return create_app\n",
     "edlm.decode.rules (2) -> edlm.serve.app (4)"),
    # `from package import module` names the module, not only the package
    ("edlm.masks", "def _cli():\n    from edlm.cli import serve\n    return serve\n",
     "edlm.masks (1) -> edlm.cli.serve (6)"),
    # plain `import` at module level
    ("edlm.errors", "import edlm.config\n", "edlm.errors (0) -> edlm.config (1)"),
    # a relative import from a package's __init__
    ("edlm.decode", "def _train():\n    from ..train import convert\n    return convert\n",
     "edlm.decode (2) -> edlm.train.convert (4)"),
    # the package root re-exports everything: importing it hides what is really used
    ("edlm.model", "def _api():\n    import edlm\n    return edlm\n",
     "edlm.model imports the edlm package root; import the module itself"),
])
def test_a_planted_upward_import_is_caught(package_copy, low, code, found):
    plant(package_copy, low, code)
    assert upward_imports(imports(package_copy)) == [found]


def test_a_module_outside_every_layer_is_reported(package_copy):
    plant(package_copy, "edlm.helpers", "from edlm.errors import EdlmError\n")
    with pytest.raises(AssertionError, match="edlm.helpers belongs to no layer"):
        upward_imports(imports(package_copy))


def test_a_planted_cycle_is_caught(package_copy):
    # both inside layer 2, so only the cycle check can see it
    plant(package_copy, "edlm.decode.rules", "def _late():\n    from edlm.decode import strategies\n")
    graph = imports(package_copy)
    assert upward_imports(graph) == []
    cycle = import_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert {"edlm.decode.rules", "edlm.decode.strategies"} <= set(cycle)
    assert all(b in graph[a] for a, b in zip(cycle, cycle[1:], strict=False))  # every edge is a real import
