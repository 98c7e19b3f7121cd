"""``GET /metrics`` over HTTP, served on the process's own event loop.

prometheus_client's ``start_http_server`` scrapes from a thread, which would
read the daemon's dicts (links, collectives) while the loop changes them. Here
a scrape runs as one loop callback between two others, so it sees a
consistent state and needs no locks; rendering a few dozen series costs well
under a millisecond. One request per connection, bounded in size and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

# What generate_latest writes (CONTENT_TYPE_LATEST names another version in
# recent prometheus_client releases).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_HEAD_BYTES = 8192
REQUEST_TIMEOUT_S = 5.0


class MetricsServer:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(
            self._serve, host, port, limit=MAX_REQUEST_HEAD_BYTES
        )
        addr = self._server.sockets[0].getsockname()
        log.info("metrics on http://%s:%d/metrics", addr[0], addr[1])
        return str(addr[0]), int(addr[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
                status, body, ctype = self._answer(head)
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a scraper that went away or sent garbage: nothing to answer
        finally:
            writer.close()

    def _answer(self, head: bytes) -> tuple[str, bytes, str]:
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3:
            return "400 Bad Request", b"bad request line\n", "text/plain"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method != b"GET":
            return "405 Method Not Allowed", b"GET only\n", "text/plain"
        if target not in (b"/metrics", b"/"):
            return "404 Not Found", b"try /metrics\n", "text/plain"
        try:
            return "200 OK", generate_latest(self.registry), CONTENT_TYPE
        except Exception as exc:  # a collector bug must cost the scrape, not the daemon
            log.exception("metrics: collecting failed")
            return "500 Internal Server Error", f"{exc!r}\n".encode(), "text/plain"
