"""Codecs: float32 vectors to bytes and back, for every hop of a collective.

Pure functions of their input (no I/O, no environment): ``none`` (raw
float32), ``fp16``/``bf16`` (16-bit floats), ``uint8``/``uint4`` (blockwise
min-max quantization) and an lz4 wrapper for any of them. Encodings are
bit-for-bit deterministic across machines; see each module for its layout.
Use ``get_codec(name)`` rather than the classes to share instances.
"""

from collnet.codec.base import Codec
from collnet.codec.compressed import Lz4Codec
from collnet.codec.halfprec import Bf16Codec, Fp16Codec
from collnet.codec.minmax import DEFAULT_BLOCK_SIZE, MinMaxCodec, Uint4Codec, Uint8Codec
from collnet.codec.raw import RawCodec
from collnet.codec.registry import CODEC_NAMES, get_codec

__all__ = [
    "CODEC_NAMES",
    "DEFAULT_BLOCK_SIZE",
    "Bf16Codec",
    "Codec",
    "Fp16Codec",
    "Lz4Codec",
    "MinMaxCodec",
    "RawCodec",
    "Uint4Codec",
    "Uint8Codec",
    "get_codec",
]
