"""Fixtures of the security tests: another local user, and probes run as that user.

The attacks these tests replay come from another, unprivileged user of the
same machine. Run as root, the suite makes that user (``collnet-probe``,
no home, no shell) if it is missing and runs small self-contained probe
scripts as it with ``setpriv --reuid --regid --clear-groups``; otherwise
every test that needs it is skipped, saying why.

The probe user cannot read /root, where this interpreter and its packages
may live. So the probes import only pyzmq and msgpack, copied once per
session into a world-readable directory, and run under the first Python
3.{same minor} interpreter that user can execute (this one, else
/usr/bin/python3). Clusters are the integration tests' (cluster_harness),
started in a world-traversable directory so that socket and file modes, not
a private parent directory, are what keep the probe out.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import zmq
from otheruser import OtherUser

# The integration tests' cluster harness, for the tests of this directory.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))
# The unit tests' link router (recording_router), for meshes that carry no collective.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))

PROBE_USER = "collnet-probe"
PROBE = Path(__file__).resolve().parent / "probe.py"


def _ensure_user() -> pwd.struct_passwd:
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(PROBE_USER)
    subprocess.run(
        ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", PROBE_USER],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(PROBE_USER)


def _copy_probe_libs(dest: Path) -> None:
    """pyzmq (with its bundled libzmq) and msgpack, as the probe user will import them."""
    site = Path(zmq.__file__).resolve().parent.parent
    for name in ("zmq", "pyzmq.libs", "msgpack"):
        src = site / name
        if src.exists():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    if Path(msgpack.__file__).resolve().parent.parent != site:
        shutil.copytree(Path(msgpack.__file__).resolve().parent, dest / "msgpack")
    shutil.copy(PROBE, dest / "probe.py")
    for root, _dirs, files in os.walk(dest):
        os.chmod(root, 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644 if not f.endswith(".so") else 0o755)


def _runnable_python(uid: int, gid: int, libdir: Path) -> str | None:
    version = f"python3.{sys.version_info.minor}"
    for candidate in (sys.executable, f"/usr/bin/{version}", "/usr/bin/python3"):
        if not os.path.exists(candidate):
            continue
        check = subprocess.run(
            [
                "setpriv",
                f"--reuid={uid}",
                f"--regid={gid}",
                "--clear-groups",
                candidate,
                "-c",
                "import sys, zmq, msgpack; "
                f"assert sys.version_info[:2] == {tuple(sys.version_info[:2])}",
            ],
            env={"PYTHONPATH": str(libdir), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            check=False,
            cwd="/",
        )
        if check.returncode == 0:
            return candidate
    return None


@pytest.fixture(scope="session")
def other_user() -> Iterator[OtherUser]:
    if os.geteuid() != 0:
        pytest.skip("needs root, to run probes as another user (setpriv)")
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to run probes as another user")
    try:
        user = _ensure_user()
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.skip(f"cannot create the probe user {PROBE_USER}: {exc}")
    base = Path(tempfile.mkdtemp(prefix="collnet-security-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        libdir = base / "lib"
        libdir.mkdir()
        _copy_probe_libs(libdir)
        python = _runnable_python(user.pw_uid, user.pw_gid, libdir)
        if python is None:
            pytest.skip(
                f"no Python 3.{sys.version_info.minor} that {PROBE_USER} can run with "
                "pyzmq and msgpack (this interpreter is not readable by other users, "
                f"and /usr/bin has no python3.{sys.version_info.minor})"
            )
        yield OtherUser(PROBE_USER, user.pw_uid, user.pw_gid, python, libdir)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def workdir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A cluster directory anyone may traverse (so the files' own modes are what count)."""
    path = Path(tempfile.mkdtemp(prefix="collnet-security-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for log in sorted(path.glob("*.log")):
            print(f"=== {log}\n{log.read_text(errors='replace')[-4000:]}")
    shutil.rmtree(path, ignore_errors=True)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
