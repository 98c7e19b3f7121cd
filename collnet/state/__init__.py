"""Shared-state sync, sans I/O: digests, manifests, the majority and transfer plans.

A peer describes its state with ``manifest_of``; manifests travel as plain
msgpack (``to_wire``/``from_wire``); ``majority`` picks the reference state,
``diverged`` says who is out of parity, ``transfer_plan`` says which byte
ranges a peer fetches from which holders, and ``verify`` accepts a received
tensor only if its digest is the reference's. No module here does I/O.
"""

from collnet.state.digest import (
    MAX_NAME_CHARS,
    MAX_TENSORS,
    StateManifest,
    TensorInfo,
    allocate,
    byte_view,
    manifest_of,
    numpy_dtype,
    tensor_digest,
)
from collnet.state.plan import (
    Fetch,
    check_fetch,
    diverged,
    holders,
    in_parity,
    majority,
    shared_transfers,
    stale_names,
    transfer_plan,
    verify,
)

__all__ = [
    "MAX_NAME_CHARS",
    "MAX_TENSORS",
    "Fetch",
    "StateManifest",
    "TensorInfo",
    "allocate",
    "byte_view",
    "check_fetch",
    "diverged",
    "holders",
    "in_parity",
    "majority",
    "manifest_of",
    "numpy_dtype",
    "shared_transfers",
    "stale_names",
    "tensor_digest",
    "transfer_plan",
    "verify",
]
