"""Codec lookup by wire name.

A codec is named by one of ``CODEC_NAMES``, optionally followed by ``+lz4``
(``"uint8+lz4"``), or by the bare name plus ``lz4=True``. The min-max codecs
also take a block size, which every peer of a collective must agree on
(it is not stored in the encoding).

Codecs are stateless, so instances are cached and shared: the same
arguments return the same object, which is safe to use from several threads.
"""

from __future__ import annotations

import functools
import operator

from collnet.codec.base import Codec
from collnet.codec.compressed import Lz4Codec
from collnet.codec.halfprec import Bf16Codec, Fp16Codec
from collnet.codec.minmax import DEFAULT_BLOCK_SIZE, Uint4Codec, Uint8Codec
from collnet.codec.raw import RawCodec
from collnet.errors import InvalidArgument

CODEC_NAMES = ("none", "fp16", "bf16", "uint8", "uint4")
LZ4_SUFFIX = "+lz4"
_BLOCKWISE = frozenset({"uint8", "uint4"})


def get_codec(name: str, *, block_size: int = DEFAULT_BLOCK_SIZE, lz4: bool = False) -> Codec:
    """Return the (shared) codec called ``name``.

    ``name`` is one of ``CODEC_NAMES``, optionally suffixed with ``+lz4``;
    ``lz4=True`` adds the suffix's effect to a bare name. ``block_size`` only
    affects ``uint8``/``uint4`` but is validated for every name so a bad value
    is caught wherever it is passed. Raises ``InvalidArgument`` for an unknown
    name or a bad block size.
    """
    if not isinstance(name, str):
        raise InvalidArgument(f"codec name must be a string, got {name!r}")
    base = name
    if base.endswith(LZ4_SUFFIX):
        base, lz4 = base[: -len(LZ4_SUFFIX)], True
    if base not in CODEC_NAMES:
        valid = ", ".join(CODEC_NAMES)
        raise InvalidArgument(
            f"unknown codec {name!r}; valid names: {valid} (each optionally with '+lz4')",
            codec=name,
            valid=list(CODEC_NAMES),
        )
    if isinstance(block_size, bool):
        raise InvalidArgument(f"block_size must be an integer, got {block_size!r}")
    try:
        size = operator.index(block_size)
    except TypeError:
        raise InvalidArgument(f"block_size must be an integer, got {block_size!r}") from None
    if size < 1:
        raise InvalidArgument(f"block_size must be >= 1, got {size}", block_size=size)
    # Non-blockwise codecs ignore the block size, so they share one instance.
    return _build(base, size if base in _BLOCKWISE else 0, bool(lz4))


@functools.lru_cache(maxsize=64)
def _build(base: str, block_size: int, lz4: bool) -> Codec:
    codec: Codec
    if base == "none":
        codec = RawCodec()
    elif base == "fp16":
        codec = Fp16Codec()
    elif base == "bf16":
        codec = Bf16Codec()
    elif base == "uint8":
        codec = Uint8Codec(block_size)
    else:
        codec = Uint4Codec(block_size)
    if lz4:
        return Lz4Codec(_build(base, block_size, False))
    return codec
