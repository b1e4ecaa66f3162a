"""The shape of the package (docs/architecture.md), checked from the source: the layers, what may import what, no
import circle (function-level imports included), few floors, no private name imported across modules, and no
experiment code or plotting in the library."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import tagdiff

ROOT = Path(tagdiff.__file__).parent

# Each layer (a module or a sub-package of tagdiff) and the layers it may import. The CLI is the application on top
# of the library; tagdiff/__init__.py is the public face and may import any layer but the CLI.
LAYERS: dict[str, set[str]] = {
    "_utils": set(),
    "_io": set(),
    "operators": {"_utils"},
    "sampling": {"_utils"},
    "models": {"_utils", "_io", "sampling"},
    "data": {"_utils", "_io", "sampling", "models"},
    "guidance": {"_utils", "sampling", "models", "operators"},
    "metrics": {"_utils", "sampling", "models"},
    "training": {"_utils", "_io", "sampling", "models", "data"},
    "integrations": {"_utils", "sampling", "models", "guidance", "metrics"},
    "cli": {"_utils", "_io", "operators", "sampling", "models", "data", "guidance", "metrics", "training",
            "integrations", "cli"},
}
LIBRARY_FORBIDDEN = ("tagdiff_bench", "matplotlib", "tagdiff.cli")
MAX_FLOORS = 8


def _module(path: Path) -> str:
    parts = ("tagdiff", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts).removesuffix(".__init__")


@cache
def _files() -> dict[str, Path]:
    return {_module(p): p for p in ROOT.rglob("*.py")}


def _imports(path: Path, module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every import statement of the file, lazy ones included."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            out.append((name, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
    return out


@cache
def _graph() -> dict[str, set[str]]:
    """Module → the tagdiff modules it imports (``from pkg import submodule`` counts as importing the submodule)."""
    files = _files()
    graph = {}
    for m, p in files.items():
        deps = set()
        for name, names, _ in _imports(p, m):
            subs = {f"{name}.{n}" for n in names} & files.keys()
            deps |= subs or ({name} & files.keys())
        graph[m] = deps - {m}
    return graph


def _faces() -> set[str]:
    """``__init__.py`` files that define nothing (they only hand names on)."""
    return {m for m, p in _files().items() if p.name == "__init__.py" and not any(
        isinstance(n, (ast.FunctionDef, ast.ClassDef)) for n in ast.parse(p.read_text()).body)}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if d == "tagdiff":   # the package face (``from .. import __version__``) re-exports the library
                continue
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_at_most_eight_floors():
    """Floors as ``farm-studio look`` draws them: a room is a top-level module or a sub-package (``sampling/``,
    ``models/``, ...), and a room stands one floor above the highest room it imports. The library and its CLI fit
    in 7 floors (the experiments, which import the CLI, are the 8th); inside the rooms the longest chain of modules
    is 12 (``cli/__main__`` → ``cli/main`` → ``cli/train`` → ``cli/latent`` → ``cli/data`` → ``data`` → ...)."""
    rooms: dict[str, set[str]] = {}
    for m, deps in _graph().items():
        rooms.setdefault(_layer(m), set()).update(_layer(d) for d in deps if _layer(d) != _layer(m))

    @cache
    def floor(room: str) -> int:
        return 1 + max((floor(d) for d in rooms[room] if d != "__init__"), default=0)

    floors = {r: floor(r) for r in rooms}
    assert max(floors.values()) <= MAX_FLOORS - 1, floors
    assert floors["cli"] == max(floors.values())   # the application stands on the library, never below it

    faces = _faces()
    graph = _graph()

    @cache
    def module_floor(m: str) -> int:
        return 1 + max((module_floor(d) for d in graph[m] if d not in faces), default=0)

    assert max(module_floor(m) for m in graph if m not in faces) <= 12


def test_layers_import_only_what_they_may():
    bad = []
    for m, deps in _graph().items():
        layer = _layer(m)
        if layer == "__init__":
            assert not any(_layer(d) == "cli" for d in deps), m
            continue
        allowed = LAYERS[layer] | {layer}
        bad += [f"{m} -> {d}" for d in deps if d != "tagdiff" and _layer(d) not in allowed]
    assert not bad, bad


def test_the_library_holds_no_experiment_code_and_no_plotting():
    bad = []
    for m, p in _files().items():
        if _layer(m) == "cli":
            continue
        bad += [f"{m}:{line} imports {name}" for name, _, line in _imports(p, m)
                if name.startswith(LIBRARY_FORBIDDEN)]
    assert not bad, bad


def test_no_private_name_is_imported_across_modules():
    bad = []
    for m, p in _files().items():
        for name, names, line in _imports(p, m):
            if name.startswith("tagdiff") and name != m:
                bad += [f"{m}:{line} imports {name}.{n}" for n in names if n.startswith("_") and n != "__version__"
                        and f"{name}.{n}" not in _files()]
    assert not bad, bad


def test_modules_stay_readable():
    """Modules under about 400 lines (STYLE: one step readable in one screen, one module in one sitting)."""
    long = {m: n for m, p in _files().items() if (n := len(p.read_text().splitlines())) > 420}
    assert not long, long
