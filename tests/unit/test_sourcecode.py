"""The shape of the source, checked: a pure core, small modules, no import cycles.

``wire``, ``codec``, ``algo``, ``engine``, ``membership``, ``state`` and
``topology`` are sans-I/O state machines and functions; this test walks their
source so a stray import of asyncio, socket or zmq (or a read of os.environ)
fails CI, not a review. No shipped module (core, daemon, SDK) is over
``MAX_LINES`` lines, and no two of them import each other, directly or through
others, not even for type checking only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import collnet_client
import collnet_daemon
import pytest

import collnet

PURE = ("wire", "codec", "algo", "engine", "membership", "state", "topology")
MAX_LINES = 500
SHIPPED = {
    "collnet": Path(collnet.__file__).parent,
    "collnet_daemon": Path(collnet_daemon.__file__).parent,
    "collnet_client": Path(collnet_client.__file__).parent,
}
FORBIDDEN_MODULES = {
    "asyncio",
    "socket",
    "zmq",
    "uvloop",
    "selectors",
    "subprocess",
    "threading",
    "os",
}
ROOT = Path(collnet.__file__).parent


def _sources() -> list[Path]:
    files = [f for pkg in PURE for f in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 10, "the pure packages were not found"
    return files


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_core_module_does_no_io(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            names = []
        for name in names:
            assert name.split(".")[0] not in FORBIDDEN_MODULES, f"{path.name} imports {name}"
        if isinstance(node, ast.Attribute) and node.attr in {"environ", "getenv"}:
            raise AssertionError(f"{path.name}:{node.lineno} reads the environment")
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "open":
            raise AssertionError(f"{path.name}:{node.lineno} opens a file")


def _modules() -> dict[str, Path]:
    """Every shipped module by dotted name (a package by its ``__init__``)."""
    out: dict[str, Path] = {}
    for top, root in SHIPPED.items():
        # A compiled module is known by its stub: a leaf here, but a module.
        for path in sorted([*root.rglob("*.py"), *root.rglob("*.pyi")]):
            parts = [top, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The shipped modules ``name`` imports anywhere in its source (functions and
    ``TYPE_CHECKING`` blocks included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pkg import sub`` imports the submodule when there is one.
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def test_no_shipped_module_is_over_the_size_limit() -> None:
    big = {
        name: n
        for name, path in _modules().items()
        if path.suffix == ".py"
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_no_import_cycle_among_the_shipped_packages() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # Tarjan's strongly connected components: any of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_daemon_imports_nothing_from_the_sdk_and_the_sdk_nothing_from_the_daemon() -> None:
    modules = _modules()
    for name, path in modules.items():
        top = name.split(".")[0]
        other = {"collnet_daemon": "collnet_client", "collnet_client": "collnet_daemon"}.get(top)
        if other is not None:
            bad = {m for m in _imports(name, path, modules) if m.split(".")[0] == other}
            assert not bad, f"{name} imports {bad}"
