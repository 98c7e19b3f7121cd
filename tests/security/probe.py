"""A probe run as another local user: it tries things against a daemon and reports.

Self-contained (stdlib, pyzmq, msgpack only): it runs under an interpreter
and a copy of those packages that the probe user can read. Its one argument
is a JSON list of steps; it prints a JSON list with the result of each:

- ``{"do": "connect_unix", "path"}``: connect a plain Unix socket; "ok" or
  the error's name (PermissionError, ...).
- ``{"do": "ask", "address", "request", "token"?}``: one local-API request
  (``token`` given: sent as the first frame, as the SDK does on TCP); the
  daemon's reply, or ``{"no_reply": true}``.
- ``{"do": "read", "path"}``: the file's text, or the error's name.
- ``{"do": "make_shm", "name", "values"}``: a float32 segment in /dev/shm,
  owned by this user, holding ``values``; "ok".
- ``{"do": "read_shm", "name", "count"}``: its first ``count`` float32 values.
- ``{"do": "symlink", "name", "target"}``: /dev/shm/NAME -> TARGET; "ok" or
  the error's name.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
from typing import Any

import msgpack
import zmq


def ask(address: str, request: dict[str, Any], token: str | None) -> Any:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        body = msgpack.packb({"id": 1, **request}, use_bin_type=True)
        sock.send_multipart([token.encode(), body] if token is not None else [body])
        if not sock.poll(5000, zmq.POLLIN):
            return {"no_reply": True}
        return msgpack.unpackb(sock.recv(), raw=False)
    finally:
        sock.close(0)


def step(s: dict[str, Any]) -> Any:
    try:
        if s["do"] == "connect_unix":
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as u:
                u.connect(s["path"])
            return "ok"
        if s["do"] == "ask":
            return ask(s["address"], s["request"], s.get("token"))
        if s["do"] == "read":
            with open(s["path"]) as f:
                return f.read()
        if s["do"] == "make_shm":
            values = s["values"]
            with open(f"/dev/shm/{s['name']}", "xb") as f:
                f.write(struct.pack(f"{len(values)}f", *values))
            return "ok"
        if s["do"] == "read_shm":
            with open(f"/dev/shm/{s['name']}", "rb") as f:
                return list(struct.unpack(f"{s['count']}f", f.read(4 * s["count"])))
        if s["do"] == "symlink":
            os.symlink(s["target"], f"/dev/shm/{s['name']}")
            return "ok"
    except OSError as exc:
        return type(exc).__name__
    raise ValueError(f"unknown step {s!r}")


if __name__ == "__main__":
    print(json.dumps([step(s) for s in json.loads(sys.argv[1])]))
