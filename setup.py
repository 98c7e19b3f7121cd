"""Build hook for the optional C accelerator; all metadata lives in pyproject.toml.

``collnet.codec._minmax`` speeds up the uint8/uint4 codecs. It is optional:
without a C compiler the build skips it and ``collnet.codec.minmax`` uses its
bit-identical numpy path.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "collnet.codec._minmax",
            ["collnet/codec/_minmax.c"],
            # No FMA contraction and no fast-math: the kernels must round
            # exactly like numpy's separate float32 operations.
            extra_compile_args=["-O3", "-fno-fast-math", "-ffp-contract=off"],
            optional=True,
        )
    ]
)
