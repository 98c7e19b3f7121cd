"""The sans-I/O frame format: fixed binary header, msgpack meta, raw payload.

``frames`` owns the layout and encoding, ``reader`` the incremental,
zero-copy decoding. Nothing here touches a socket or an event loop.
"""

from collnet.wire.frames import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    VERSION,
    Frame,
    FrameKind,
    Header,
    Limits,
    encode_frame,
    frame_bytes,
)
from collnet.wire.reader import FrameReader, PayloadSink

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "VERSION",
    "Frame",
    "FrameKind",
    "FrameReader",
    "Header",
    "Limits",
    "PayloadSink",
    "encode_frame",
    "frame_bytes",
]
