"""How large a data connection's kernel buffers are, and who decides it.

A TCP socket's buffer is either grown by the kernel itself, per connection,
as its bandwidth-delay product needs (autotuning, up to the third field of
``net.ipv4.tcp_wmem`` / ``tcp_rmem``), or fixed by ``SO_SNDBUF`` /
``SO_RCVBUF``, which switches autotuning off for that buffer and is capped at
``net.core.wmem_max`` / ``rmem_max`` (the kernel then doubles it for its own
overhead). A fixed buffer is kept where it is at least what autotuning would
reach (up to the size collnet wants); where the fixed one would be smaller
it is not asked for: on a stock host ``rmem_max`` is 208 KiB, and a fixed
receive buffer of twice that holds one stream to ~33 Mbit/s on a 100 ms
path, where autotuning grows it, per connection with its own link's
bandwidth-delay product, to 6 MiB.

The caps are the running network namespace's, read once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

# What collnet would like per connection: a long fat link's share at K streams.
WANTED_BUFFER_BYTES = 8 << 20
# Linux's defaults, where /proc cannot be read.
_DEFAULT_CORE_MAX = 212992
_DEFAULT_TCP_WMEM_MAX = 4 << 20
_DEFAULT_TCP_RMEM_MAX = 6 << 20


@dataclass(frozen=True)
class BufferCaps:
    """The kernel's caps on one of a TCP socket's buffers, in bytes."""

    # net.core.{w,r}mem_max: the most SO_SNDBUF / SO_RCVBUF may ask.
    fixed_max: int
    # The third field of net.ipv4.tcp_{w,r}mem: how far autotuning grows it.
    autotune_max: int

    def request(self, wanted: int = WANTED_BUFFER_BYTES) -> int | None:
        """The size to ask for, or None: leave the buffer to autotuning."""
        return wanted if self.fixed_bytes(wanted) >= min(wanted, self.autotune_max) else None

    def fixed_bytes(self, wanted: int = WANTED_BUFFER_BYTES) -> int:
        """What asking for ``wanted`` gives (the kernel doubles the capped request)."""
        return 2 * min(wanted, self.fixed_max)

    def effective_bytes(self, wanted: int = WANTED_BUFFER_BYTES) -> int:
        """The largest this buffer becomes, asked for or autotuned."""
        return self.autotune_max if self.request(wanted) is None else self.fixed_bytes(wanted)


@dataclass(frozen=True)
class SocketCaps:
    send: BufferCaps
    receive: BufferCaps

    def window_bytes(self) -> int:
        """What one stream keeps in flight at most: half the smaller of its buffers
        (the kernel keeps the other half for its own overhead)."""
        return max(64 << 10, min(self.send.effective_bytes(), self.receive.effective_bytes()) // 2)


def _read_int(path: str, field: int, default: int) -> int:
    try:
        return int(Path(path).read_text().split()[field])
    except (OSError, ValueError, IndexError):
        return default


@functools.cache
def kernel_caps() -> SocketCaps:
    """This network namespace's caps (see the module docstring)."""
    return SocketCaps(
        send=BufferCaps(
            _read_int("/proc/sys/net/core/wmem_max", 0, _DEFAULT_CORE_MAX),
            _read_int("/proc/sys/net/ipv4/tcp_wmem", 2, _DEFAULT_TCP_WMEM_MAX),
        ),
        receive=BufferCaps(
            _read_int("/proc/sys/net/core/rmem_max", 0, _DEFAULT_CORE_MAX),
            _read_int("/proc/sys/net/ipv4/tcp_rmem", 2, _DEFAULT_TCP_RMEM_MAX),
        ),
    )
