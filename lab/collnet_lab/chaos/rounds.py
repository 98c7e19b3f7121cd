"""What a round computes, and the check of its result against numpy.

A trainer's input to round ``(epoch, k)`` depends only on (the run's seed, its
peer id, the epoch, k), so the float64 reference over exactly the peers of a
world can be computed by any trainer.
"""

from __future__ import annotations

import threading
import zlib
from collections import OrderedDict
from typing import Any

import numpy as np
import numpy.typing as npt

from collnet_lab.up import error_bound


def round_plan(k: int, quantized: bool) -> tuple[str, str]:
    """(codec, algorithm) of round ``k``: the same on every member of the epoch."""
    codec = "uint8" if quantized and k % 4 == 3 else "none"
    algo = "star" if k % 5 == 2 else "direct" if k % 5 == 4 else "ring"
    return codec, algo


def peer_input(seed: int, peer: str, epoch: int, k: int, n: int, codec: str) -> npt.NDArray[Any]:
    """The tensor ``peer`` contributes to round ``(epoch, k)``.

    Codec none: the first half holds small integers (their float32 sum is
    exact in any order), the rest uniform floats in [-1, 1). Quantized rounds:
    uniform floats throughout (the codec's error bound assumes that range).
    """
    rng = np.random.default_rng([seed, zlib.crc32(peer.encode()), epoch, k])
    if codec != "none":
        out: npt.NDArray[Any] = rng.random(n, dtype=np.float32) * 2 - 1
        return out
    half = n // 2
    out = np.empty(n, np.float32)
    out[:half] = rng.integers(-8, 9, half)
    out[half:] = rng.random(n - half, dtype=np.float32) * 2 - 1
    return out


class References:
    """The float64 reference sum of a round over its world; computed once, shared."""

    def __init__(self, seed: int, n: int) -> None:
        self.seed, self.n = seed, n
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[Any, ...], npt.NDArray[np.float64]] = OrderedDict()

    def get(self, epoch: int, k: int, peers: tuple[str, ...], codec: str) -> npt.NDArray[Any]:
        key = (epoch, k, peers, codec)
        with self._lock:
            ref = self._cache.get(key)
            if ref is None:
                ref = np.zeros(self.n, np.float64)
                for p in peers:
                    ref += peer_input(self.seed, p, epoch, k, self.n, codec)
                self._cache[key] = ref
                while len(self._cache) > 32:
                    self._cache.popitem(last=False)
            return ref


def check_result(
    res: npt.NDArray[Any], ref: npt.NDArray[Any], world: int, codec: str
) -> str | None:
    """Why ``res`` is not the all-reduce of the round, or None when it is."""
    if codec != "none":
        bound = error_bound(codec, world)
        err = float(np.max(np.abs(res.astype(np.float64) - ref)))
        return None if err <= bound else f"{codec} error {err:.3g} > bound {bound:.3g}"
    half = len(res) // 2
    votes = float(res[0])
    if not (votes == int(votes) and 0 <= votes <= world):
        return f"stop-vote slot holds {votes}, not an integer in [0, {world}]"
    exact = res[1:half].astype(np.float64)
    bad = np.flatnonzero(exact != ref[1:half])
    if bad.size:
        i = int(bad[0]) + 1
        return f"integer half differs at {bad.size} elements (first [{i}]: {res[i]} != {ref[i]})"
    atol = world * world * float(np.finfo(np.float32).eps)
    err = float(np.max(np.abs(res[half:].astype(np.float64) - ref[half:]), initial=0.0))
    return None if err <= atol else f"float half error {err:.3g} > {atol:.3g}"
