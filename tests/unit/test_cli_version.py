"""``collnet --version``, and the daemon's CLI loading the lab only on demand.

The daemon (``collnet_daemon``) ships without the lab: no module of it names
``collnet_lab`` or ``collnet_client`` in an import statement, and importing it
loads neither; ``collnet up`` / ``collnet chaos`` are imported by module path
when they are run or listed.
"""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import collnet_daemon
from click.testing import CliRunner
from collnet_daemon.cli import main


def test_version_prints_the_installed_distribution_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output == f"collnet {importlib.metadata.version('collnet')}\n"


def test_help_lists_the_lab_commands_next_to_the_daemons() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    listed = result.output.split("Commands:", 1)[1].split()
    for name in ("chaos", "coordinator", "daemon", "status", "up"):
        assert name in listed, result.output


def test_daemon_cli_imports_neither_the_lab_nor_the_sdk() -> None:
    # A fresh interpreter: this test process may have imported the lab already.
    code = (
        "import sys, collnet_daemon.cli, collnet_daemon.service; "
        "bad = sorted(m for m in sys.modules if m.startswith(('collnet_lab', 'collnet_client'))); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_version_through_python_dash_m() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "collnet_daemon", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"collnet {importlib.metadata.version('collnet')}"


def test_no_daemon_module_names_the_lab_or_the_sdk_in_an_import_statement() -> None:
    """Not even inside a function or under TYPE_CHECKING: the lab is loaded by name."""
    root = Path(collnet_daemon.__file__).parent
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top not in {"collnet_lab", "collnet_client"}, (
                    f"{path.name}:{node.lineno} imports {name}"
                )
