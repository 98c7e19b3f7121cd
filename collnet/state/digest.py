"""Tensor digests and state manifests: what a peer says it holds.

A peer's shared state is a set of named tensors at a *revision*. Its
``StateManifest`` lists, per name, the dtype, shape, size and a content
digest; peers compare manifests (through the coordinator) instead of
tensors, so only tensors whose digests differ ever move.

Invariants:

- ``tensor_digest`` is a pure function of the tensor's *logical* content:
  dtype name, shape and the bytes of its C-order layout. A reshaped or
  reinterpreted (``view``) tensor with the same bytes gets a different
  digest; the same values in Fortran order or a strided view get the same
  digest as their C-contiguous copy.
- Every dtype a manifest names can be rebuilt from its name alone
  (``numpy_dtype``), native byte order, fixed size, no objects, so a joiner
  can allocate a tensor from a manifest entry and fill it with raw bytes.
- ``TensorInfo.nbytes == itemsize(dtype) * prod(shape)`` always holds, for
  manifests built locally and for those decoded from the wire.
- ``StateManifest.from_wire`` accepts exactly what ``to_wire`` produces
  (plain msgpack types) and raises ``ProtocolError`` for anything else, never
  another exception: manifests arrive from the network.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, TypeGuard

import ml_dtypes
import numpy as np
import numpy.typing as npt
import xxhash

from collnet.errors import InvalidArgument, ProtocolError

__all__ = [
    "DIGEST_HEX_CHARS",
    "MAX_NAME_CHARS",
    "MAX_NDIM",
    "MAX_TENSORS",
    "MAX_TENSOR_BYTES",
    "StateManifest",
    "TensorInfo",
    "allocate",
    "byte_view",
    "manifest_of",
    "numpy_dtype",
    "tensor_digest",
]

# Wire limits. A manifest is one msgpack message; these bound what a hostile
# or broken peer can make us allocate and iterate before we reject it.
MAX_TENSORS: Final = 65536
MAX_NAME_CHARS: Final = 256
MAX_NDIM: Final = 64  # numpy's own limit (NPY_MAXDIMS in numpy 2)
MAX_TENSOR_BYTES: Final = 1 << 48  # 256 TiB: far above any real tensor, far below int64
MAX_REVISION: Final = (1 << 63) - 1  # msgpack int64: every peer can decode it
DIGEST_HEX_CHARS: Final = 32  # xxh3_128

_DIGEST_RE: Final = re.compile(r"[0-9a-f]{32}")

# Domain separation: a future digest scheme changes this tag, so digests of
# two schemes can never be confused for one another.
_DIGEST_TAG: Final = b"collnet.tensor.xxh3_128.v1\0"


def _supported_dtypes() -> dict[str, np.dtype[Any]]:
    names = [
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    ]
    table: dict[str, np.dtype[Any]] = {}
    for name in names:
        dt = np.dtype(name)
        table[dt.name] = dt
    # ml_dtypes' types register under their own names; getattr keeps older
    # ml_dtypes releases (without some float8 variants) importable.
    for name in (
        "bfloat16",
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e4m3b11fnuz",
    ):
        scalar = getattr(ml_dtypes, name, None)
        if scalar is not None:
            dt = np.dtype(scalar)
            table[dt.name] = dt
    return table


# An allow-list, not ``np.dtype(name)``: numpy parses far more than names
# ("O", "S5", "f4,i8", ">f4", "M8[ns]"), and a manifest from the network must
# not be able to make a joiner allocate object arrays or structured records.
_DTYPES: Final[Mapping[str, np.dtype[Any]]] = MappingProxyType(_supported_dtypes())


def numpy_dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype a manifest's dtype name denotes; ``InvalidArgument`` if unsupported."""
    dt = _DTYPES.get(name)
    if dt is None:
        raise InvalidArgument(
            f"unsupported state dtype {name!r}; expected one of {sorted(_DTYPES)}", dtype=name
        )
    return dt


def _check_dtype(dtype: np.dtype[Any]) -> str:
    # Equality, not just the name: '>f4' is named float32 too, but its bytes
    # would decode to other values on a little-endian joiner.
    if _DTYPES.get(dtype.name) != dtype:
        raise InvalidArgument(
            f"unsupported state dtype {dtype.str} ({dtype.name}); shared state must use a "
            f"native-byte-order dtype among {sorted(_DTYPES)}",
            dtype=str(dtype),
        )
    return dtype.name


def byte_view(arr: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """A flat uint8 view of a C-contiguous array's bytes (no copy; writable if ``arr`` is).

    The transfer plan addresses tensors as byte ranges; this is the view that
    both the sender slices and the receiver writes (``recv_into``) into.
    """
    if not arr.flags.c_contiguous:
        raise InvalidArgument("byte_view needs a C-contiguous array", shape=list(arr.shape))
    # reshape(-1) of a C-contiguous array is a view (0-d arrays included), and
    # viewing 1-d contiguous data as uint8 works for every itemsize.
    return arr.reshape(-1).view(np.uint8)


def tensor_digest(arr: npt.NDArray[Any]) -> str:
    """xxh3_128 hex digest of a tensor's dtype name, shape and C-order bytes.

    Raises ``InvalidArgument`` for dtypes a manifest cannot carry (objects,
    structured, non-native byte order, ...).
    """
    name = _check_dtype(arr.dtype)
    h = xxhash.xxh3_128()
    # The header fixes how the bytes are to be read: without it a float32
    # tensor and its int32 view, or a (2, 3) tensor and its (3, 2) reshape,
    # would hash alike and a joiner could "verify" the wrong tensor.
    dims = ",".join(str(d) for d in arr.shape)
    h.update(_DIGEST_TAG + f"{name}\0{arr.ndim}:{dims}\0".encode())
    # ascontiguousarray copies only when arr is not already C-contiguous, so
    # the digest is of the logical (C-order) content whatever the strides.
    h.update(byte_view(np.ascontiguousarray(arr)).data)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One manifest entry: how to allocate the tensor and what its bytes hash to."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    digest: str

    @staticmethod
    def of(arr: npt.NDArray[Any]) -> TensorInfo:
        """The entry describing ``arr`` (hashes it)."""
        return TensorInfo(
            arr.dtype.name, tuple(int(d) for d in arr.shape), arr.nbytes, tensor_digest(arr)
        )

    def numpy_dtype(self) -> np.dtype[Any]:
        return numpy_dtype(self.dtype)

    def to_wire(self) -> list[Any]:
        # A 4-list, not a dict: a manifest may hold tens of thousands of
        # entries and field names would dominate its size.
        return [self.dtype, list(self.shape), self.nbytes, self.digest]

    @staticmethod
    def from_wire(obj: Any, *, name: str = "?") -> TensorInfo:
        """Decode and validate an entry; ``ProtocolError`` on anything malformed."""
        if not isinstance(obj, list | tuple) or len(obj) != 4:
            raise ProtocolError(f"bad state entry {name!r}: expected a 4-list", tensor=name)
        dtype, shape, nbytes, digest = obj
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise ProtocolError(
                f"bad state entry {name!r}: unsupported dtype {dtype!r}", tensor=name
            )
        if not isinstance(shape, list | tuple) or len(shape) > MAX_NDIM:
            raise ProtocolError(
                f"bad state entry {name!r}: shape must be a list of at most {MAX_NDIM} ints",
                tensor=name,
            )
        # Bounding each dim keeps prod() below cheap: a dict built outside
        # msgpack could otherwise carry 10**100000 as a dimension.
        if not all(_is_int(d) and 0 <= d <= MAX_TENSOR_BYTES for d in shape):
            raise ProtocolError(
                f"bad state entry {name!r}: shape {str(shape)[:128]} must hold non-negative ints",
                tensor=name,
            )
        if not _is_int(nbytes) or nbytes < 0 or nbytes > MAX_TENSOR_BYTES:
            raise ProtocolError(f"bad state entry {name!r}: bad nbytes {nbytes!r}", tensor=name)
        expected = _DTYPES[dtype].itemsize * math.prod(shape)
        if expected != nbytes:
            raise ProtocolError(
                f"bad state entry {name!r}: nbytes {nbytes} != itemsize * prod(shape) = {expected}",
                tensor=name,
            )
        if not isinstance(digest, str) or _DIGEST_RE.fullmatch(digest) is None:
            raise ProtocolError(
                f"bad state entry {name!r}: digest must be {DIGEST_HEX_CHARS} lowercase hex chars",
                tensor=name,
            )
        return TensorInfo(dtype, tuple(shape), nbytes, digest)


def _is_int(x: object) -> TypeGuard[int]:
    # bool is an int subclass; True as a dimension is a protocol error.
    return isinstance(x, int) and not isinstance(x, bool)


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
        raise ProtocolError(
            f"bad tensor name {str(name)[:64]!r}: must be a string of 1..{MAX_NAME_CHARS} chars"
        )
    return name


@dataclass(frozen=True, slots=True)
class StateManifest:
    """A peer's shared state at one revision: tensor name -> ``TensorInfo``.

    ``entries`` is stored read-only; build a new manifest to change it.
    """

    revision: int
    entries: Mapping[str, TensorInfo] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A private read-only copy: a manifest is a snapshot that planners
        # share, so a caller mutating its dict later must not change it.
        object.__setattr__(self, "entries", MappingProxyType(dict(self.entries)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StateManifest):
            return NotImplemented
        return self.revision == other.revision and dict(self.entries) == dict(other.entries)

    def __hash__(self) -> int:
        return hash((self.revision, frozenset(self.entries.items())))

    @property
    def nbytes(self) -> int:
        """Total size of the state's tensors."""
        return sum(info.nbytes for info in self.entries.values())

    def state_digest(self) -> str:
        """One digest of the whole content (names and tensor digests; not the revision).

        Two peers are in bit parity iff their revisions and state digests are
        equal; this is what a status view or a churn test compares.
        """
        h = xxhash.xxh3_128()
        for name in sorted(self.entries):
            raw = name.encode()
            # Length-prefixed: names are arbitrary strings, so no separator
            # byte can be trusted to be absent from them.
            h.update(len(raw).to_bytes(4, "little") + raw + self.entries[name].digest.encode())
        return h.hexdigest()

    def to_wire(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "entries": {name: info.to_wire() for name, info in sorted(self.entries.items())},
        }

    @staticmethod
    def from_wire(obj: Any) -> StateManifest:
        """Decode and validate a manifest; ``ProtocolError`` on anything malformed."""
        if not isinstance(obj, dict):
            raise ProtocolError("bad state manifest: expected a map")
        revision = obj.get("revision")
        if not _is_int(revision) or not 0 <= revision <= MAX_REVISION:
            raise ProtocolError(f"bad state manifest: bad revision {str(revision)[:64]!r}")
        entries = obj.get("entries")
        if not isinstance(entries, dict):
            raise ProtocolError("bad state manifest: entries must be a map")
        if len(entries) > MAX_TENSORS:
            raise ProtocolError(
                f"bad state manifest: {len(entries)} tensors, more than the limit {MAX_TENSORS}"
            )
        decoded = {
            _check_name(name): TensorInfo.from_wire(info, name=name)
            for name, info in entries.items()
        }
        return StateManifest(revision, decoded)


def manifest_of(named: Mapping[str, npt.NDArray[Any]], revision: int) -> StateManifest:
    """Hash every tensor of a local state and describe it at ``revision``.

    Raises ``InvalidArgument`` for a state no manifest can carry (bad names,
    unsupported dtypes, too many tensors, a bad revision), so a bad local
    state fails here and not on the peers that would receive it.
    """
    if not _is_int(revision) or not 0 <= revision <= MAX_REVISION:
        raise InvalidArgument(f"revision must be an int in [0, 2**63), got {revision!r}")
    if len(named) > MAX_TENSORS:
        raise InvalidArgument(f"{len(named)} tensors in the state; the limit is {MAX_TENSORS}")
    entries: dict[str, TensorInfo] = {}
    for name, arr in named.items():
        try:
            _check_name(name)
        except ProtocolError as err:
            raise InvalidArgument(err.message) from None
        if arr.nbytes > MAX_TENSOR_BYTES:
            raise InvalidArgument(f"tensor {name!r} is larger than {MAX_TENSOR_BYTES} bytes")
        entries[name] = TensorInfo.of(arr)
    return StateManifest(revision, entries)


def allocate(info: TensorInfo) -> npt.NDArray[Any]:
    """An uninitialised C-contiguous array for ``info``, for a transfer to fill."""
    return np.empty(info.shape, dtype=numpy_dtype(info.dtype))
