"""Type stub for the optional C extension built from ``_minmax.c``.

Arguments are buffers; these are the numpy arrays ``minmax.py`` passes.
"""

import numpy as np
import numpy.typing as npt

def encode(
    x: npt.NDArray[np.float32], out: npt.NDArray[np.uint8], n: int, block_size: int, bits: int, /
) -> int: ...
def decode(
    data: npt.NDArray[np.uint8],
    n: int,
    block_size: int,
    bits: int,
    out: npt.NDArray[np.float32],
    acc: npt.NDArray[np.float32] | None,
    /,
) -> int: ...
