"""The pure core stays pure: no I/O modules, no environment reads.

``wire``, ``codec``, ``algo``, ``membership``, ``state`` and ``topology`` are
sans-I/O state machines and functions; this test walks their source so a stray import of
asyncio, socket or zmq (or a read of os.environ) fails CI, not a review.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import collnet

PURE = ("wire", "codec", "algo", "membership", "state", "topology")
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
