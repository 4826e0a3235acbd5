"""The package layout: imports inside edlm only go downward and never form a cycle.

Layers, lowest first; a module may import its own layer or lower ones. Lazy imports inside
functions count too: a lazy upward import is still an upward dependency.
"""

import ast
from pathlib import Path

import edlm

SRC = Path(edlm.__file__).parent
LAYERS = [  # (module prefix, layer)
    ("edlm.errors", 0),
    ("edlm.config", 1), ("edlm.masks", 1), ("edlm.files", 1), ("edlm.testing", 1),
    ("edlm.decode", 2), ("edlm.embed", 2),
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


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """edlm module -> the edlm modules it imports (at any depth of its code)."""
    graph = {}
    for path in SRC.rglob("*.py"):
        name = module_name(path)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edlm"):
                base = node.module
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}".replace(".", "/") in MODULES else base
                          for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("edlm")}
        graph[name] = found - {name}
    return graph


MODULES = {module_name(p).replace(".", "/") for p in SRC.rglob("*.py")}


def test_every_module_has_a_layer_and_imports_only_downward():
    bad = []
    for mod, deps in imports().items():
        if mod == "edlm" or mod.endswith("__main__"):
            continue  # the public API re-exports; `python -m` entry points sit on top
        assert "edlm" not in deps, f"{mod} imports the edlm package root; import the module itself"
        bad += [f"{mod} ({layer(mod)}) -> {d} ({layer(d)})" for d in deps if layer(d) > layer(mod)]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = {m: {d for d in deps if d in imports_cache} for m, deps in imports_cache.items()}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for mod in graph:
        if mod not in state:
            visit(mod, [mod])


def test_a_planted_upward_import_is_caught(tmp_path, monkeypatch):
    """The check itself can fail: a decode module that imported the server would be reported."""
    deps = {"edlm.decode.engine": {"edlm.serve.app"}}
    assert [d for m, ds in deps.items() for d in ds if layer(d) > layer(m)] == ["edlm.serve.app"]


imports_cache = imports()
