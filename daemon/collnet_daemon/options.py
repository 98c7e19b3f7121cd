"""What the ``collnet`` commands share: option groups, and what they load or write.

Heartbeat, TLS, secret and metrics options are declared once here and used by
``coordinator``, ``daemon`` and ``status`` (``cli.py``); so are the loaders
behind them (the secret file, the TLS files and the identity they carry) and
the process chores of a long-running command (ready file, fd limit, signals).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from collnet.errors import InvalidArgument
from collnet.transport.tls import Tls, TlsFiles

# The commands' own logger (cli.py logs under the same name).
log = logging.getLogger("collnet")


def write_ready(path: str | None, **info: object) -> None:
    if path:
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, path)


async def until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def read_secret(path: str | None, role: str, tls: object = None) -> bytes | None:
    """The shared secret from a file (never from the command line itself)."""
    if not path:
        if tls is not None:
            return None  # TLS authenticates, and proves who each peer is
        log.warning(
            "%s: no shared secret (--secret-file / COLLNET_SECRET_FILE): "
            "accepting loopback peers only",
            role,
        )
        return None
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as exc:
        raise click.BadParameter(f"cannot read secret file {path}: {exc}") from None
    if len(secret) < 16:
        raise click.BadParameter(f"secret in {path} is shorter than 16 bytes")
    return secret


def raise_fd_limit() -> None:
    """Let the daemon hold a descriptor per trainer segment it maps (each is checked
    with fstat at every use), not only the usual 1024: up to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 16 if hard == resource.RLIM_INFINITY else min(hard, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def heartbeat_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--heartbeat-interval-s / -floor-s / -ceiling-s, shared by coordinator and daemon."""
    f = click.option(
        "--heartbeat-ceiling-s", default=10.0, show_default=True, type=click.FloatRange(0.05)
    )(f)
    f = click.option(
        "--heartbeat-floor-s",
        default=2.0,
        show_default=True,
        type=click.FloatRange(0.05),
        help="Smallest silence that declares a peer dead (the timeout adapts to RTT).",
    )(f)
    return click.option(
        "--heartbeat-interval-s", default=0.5, show_default=True, type=click.FloatRange(0.01)
    )(f)


def tls_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--tls-ca / --tls-cert / --tls-key (env COLLNET_TLS_*), given all three or none."""
    for name, what in (
        ("key", "This process's private key (PEM)."),
        ("cert", "This process's certificate (PEM; made by 'collnet certs issue')."),
        ("ca", "CA certificate peers' certificates must be signed by: turns on mutual TLS."),
    ):
        f = click.option(
            f"--tls-{name}",
            envvar=f"COLLNET_TLS_{name.upper()}",
            default=None,
            type=click.Path(dir_okay=False),
            help=f"{what} Env: COLLNET_TLS_{name.upper()}.",
        )(f)
    return f


def load_tls(ca: str | None, cert: str | None, key: str | None) -> Tls | None:
    given = [x for x in (ca, cert, key) if x]
    if not given:
        return None
    if len(given) != 3:
        raise click.UsageError("--tls-ca, --tls-cert and --tls-key go together")
    assert ca and cert and key
    try:
        return Tls(TlsFiles(ca, cert, key))
    except InvalidArgument as exc:
        raise click.BadParameter(exc.message, param_hint="--tls-cert") from None


secret_option = click.option(
    "--secret-file",
    envvar="COLLNET_SECRET_FILE",
    default=None,
    help="File holding the shared secret peers must prove (HMAC). Env: COLLNET_SECRET_FILE.",
)


def metrics_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--metrics-port / --metrics-host, shared by coordinator and daemon."""
    f = click.option(
        "--metrics-host",
        envvar="COLLNET_METRICS_HOST",
        default="127.0.0.1",
        show_default=True,
        help="Address of the metrics endpoint (0.0.0.0: every interface).",
    )(f)
    return click.option(
        "--metrics-port",
        envvar="COLLNET_METRICS_PORT",
        default=None,
        type=click.IntRange(0, 65535),
        help="Serve Prometheus metrics on http://HOST:PORT/metrics (0: any free port). "
        "Default: no metrics endpoint.",
    )(f)


def metrics_address(addr: tuple[str, int] | None) -> dict[str, str]:
    return {} if addr is None else {"metrics": f"{addr[0]}:{addr[1]}"}


def parse_connections(ctx: click.Context, param: click.Parameter, value: str) -> int | None:
    """``--connections``: ``auto`` (None: per link, from its estimate) or a fixed 1-64."""
    if value == "auto":
        return None
    try:
        k = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected auto or 1-64") from None
    if not 1 <= k <= 64:
        raise click.BadParameter(f"{value!r}: expected auto or 1-64")
    return k
