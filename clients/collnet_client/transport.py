"""The SDK's connection to its node's daemon: one pyzmq DEALER socket.

It sends typed requests (``collnet.wire.localapi``) as msgpack maps
``{"id", **request.to_wire()}`` and hands each reply to whoever waits for its
id; it knows nothing of tensors or collectives. Several requests may be in
flight; a reply that arrives while another one is awaited is kept until its
own wait asks for it. The lock makes one socket usable from several threads
(pyzmq sockets are not thread-safe).

Failure model:

- A wait that runs out of time raises ``WaitTimeout``: only the wait gave
  up, the request is still running in the daemon and may be waited for again.
- A daemon that exits or is killed closes the IPC connection; a zmq socket
  monitor sees that, and every wait, and every later request, fails at once
  with ``DaemonUnavailable`` instead of waiting out its timeout. A daemon
  restarted at the same address is another peer (the world and the
  collectives died with the old one), so the connection stays lost.
- A daemon's TCP endpoint (its loopback fallback) takes only requests that
  carry its token: the SDK reads it from ``token_file`` (default
  ``$COLLNET_IPC_TOKEN_FILE``, else the file next to the default ipc socket)
  and sends it as the first frame of every request. Without it the daemon
  answers ``AuthError``. The ipc socket needs no token: the daemon checks
  the connecting process's user.
- ``daemon_gone``, when given, is asked while waiting (every 50 ms or so):
  for a supervisor that knows the daemon is gone before the connection
  closes (a frozen daemon, one about to be killed). A true answer fails the
  wait with ``DaemonUnavailable`` too.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

from collnet.addresses import DEFAULT_IPC, token_file_for
from collnet.errors import AuthError, CollnetError, DaemonUnavailable, WaitTimeout
from collnet.wire.localapi import Hello, Request
from collnet.wire.localreplies import HelloReply

# The longest the handshake waits for a daemon that accepted the connection.
HELLO_TIMEOUT_S = 10.0
_POLL_S = 0.05


class Transport:
    """A connected, greeted daemon; see the module docstring."""

    def __init__(
        self,
        address: str,
        timeout_s: float,
        *,
        daemon_gone: Callable[[], bool] | None = None,
        token_file: str | None = None,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s  # the default deadline of every wait
        self._daemon_gone = daemon_gone
        path = address.removeprefix("ipc://")
        if path != address and not path.startswith("@") and not os.path.exists(path):
            # zmq would wait for the socket to appear: fail now, not after the hello timeout.
            raise DaemonUnavailable(f"no daemon listens at {address} ({path} does not exist)")
        if path != address and not path.startswith("@") and not os.access(path, os.W_OK):
            # zmq would retry the refused connect in silence: say why instead.
            raise DaemonUnavailable(
                f"this user (uid {os.getuid()}) may not use the daemon's socket {path}: "
                "it is its user's alone (or its --ipc-group's)"
            )
        # Frames sent before each request's body: the token, on TCP.
        self._head, token_path = _token_frames(address, token_file)
        self._ctx: zmq.Context[Any] = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        # Sees the daemon's side of the connection close (exit, kill -9).
        self._monitor = self._sock.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
        )
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._lost: str | None = None
        self._peer = "?"
        self._sock.connect(address)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._replies: dict[int, dict[str, Any]] = {}
        self.closed = False
        try:
            hello = self.call(Hello(), min(timeout_s, HELLO_TIMEOUT_S))
            self.hello = HelloReply.from_wire(hello)
        except WaitTimeout:
            self.close()
            raise DaemonUnavailable(f"no daemon answers at {address}") from None
        except AuthError as exc:
            self.close()
            if token_path is None:
                raise
            raise AuthError(f"{exc.message} (the token read from {token_path})") from None
        except BaseException:
            self.close()
            raise
        self._peer = self.hello.peer

    def send(self, request: Request) -> int:
        """Send ``request``; its id, for ``wait``."""
        if self.closed:
            raise DaemonUnavailable("this Comm is closed")
        if self._lost is not None:
            raise DaemonUnavailable(self._lost)
        rid = next(self._ids)
        body = msgpack.packb({"id": rid, **request.to_wire()}, use_bin_type=True)
        with self._lock:
            self._sock.send_multipart([*self._head, body])
        return rid

    def post(self, request: Request) -> None:
        """Send ``request`` if the socket takes it now; nobody waits for the reply."""
        msg = {"id": next(self._ids), **request.to_wire()}
        with contextlib.suppress(zmq.ZMQError), self._lock:
            self._sock.send_multipart(
                [*self._head, msgpack.packb(msg, use_bin_type=True)], zmq.NOBLOCK
            )

    def call(self, request: Request, timeout_s: float | None = None) -> dict[str, Any]:
        """Send ``request`` and wait for its reply (see ``wait``)."""
        return self.wait(self.send(request), timeout_s)

    def poll(self, rid: int) -> bool:
        """Whether ``wait(rid)`` would return (or raise) at once."""
        with self._lock:
            self._drain(0)
            return rid in self._replies or self._lost is not None

    def wait(self, rid: int, timeout_s: float | None = None) -> dict[str, Any]:
        """The fields of request ``rid``'s reply, or the daemon's typed error.

        ``WaitTimeout`` after ``timeout_s`` (default: ``self.timeout_s``), the
        request still pending; ``DaemonUnavailable`` once the daemon is gone.
        """
        limit = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        while True:
            with self._lock:
                reply = self._replies.pop(rid, None)
                if reply is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise WaitTimeout(
                            f"no reply from the daemon at {self.address} within {limit:.1f}s"
                        )
                    self._drain(int(min(left, _POLL_S) * 1000) + 1)
                    reply = self._replies.pop(rid, None)
                    if reply is None and self._lost is not None:
                        raise DaemonUnavailable(self._lost)
            if reply is not None:
                break
            if self._daemon_gone is not None and self._daemon_gone():
                lost = f"the daemon at {self.address} ({self._peer}) is gone"
                with self._lock:
                    self._lost = self._lost or lost
                raise DaemonUnavailable(self._lost)
        if not reply.get("ok"):
            raise CollnetError.from_wire(reply.get("error") or {})
        return reply

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self._monitor.close(linger=0)
        # A moment for the last posted messages (segment releases) to leave.
        self._sock.close(linger=200)

    def _drain(self, timeout_ms: int) -> None:
        """Take in what arrived within ``timeout_ms``: replies, and connection events."""
        ready = dict(self._poller.poll(timeout_ms))
        if self._sock in ready:
            while True:
                try:
                    body = self._sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                reply = msgpack.unpackb(body, raw=False)
                self._replies[int(reply.get("id") or 0)] = reply
        if self._monitor in ready:
            while True:
                try:
                    event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
                except zmq.Again:
                    break
                if self._lost is not None:
                    continue
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    self._lost = (
                        f"the daemon at {self.address} ({self._peer}) "
                        "closed the connection: it exited or was killed"
                    )
                elif event["event"] == zmq.EVENT_CONNECT_RETRIED:
                    # A refused connect: nothing listens (say, the socket file of a
                    # killed daemon); zmq would keep retrying until the timeout.
                    self._lost = f"nothing accepts connections at {self.address}"


def _token_frames(address: str, token_file: str | None) -> tuple[list[bytes], str | None]:
    """The token frame a TCP endpoint needs (none for ipc://), and whence it came."""
    if not address.startswith("tcp://"):
        return [], None
    path = token_file or os.environ.get("COLLNET_IPC_TOKEN_FILE") or token_file_for(DEFAULT_IPC)
    if not path:
        return [], None
    try:
        with open(path, "rb") as f:
            token = f.read(1024).strip()
    except OSError as exc:
        # The daemon answers AuthError; say why there was no token.
        return [], f"nothing: cannot read {path}: {exc.strerror}"
    return ([token], path) if token else ([], f"nothing: {path} is empty")
