"""Builds the sparse table's compiled kernels; everything else about the package is in pyproject.toml.

The extension needs only a C compiler and Python.h (arrays arrive through the buffer protocol, so no
numpy headers). It is optional: where it cannot be built, install goes on and the table uses numpy.
-ffp-contract=off keeps float32 arithmetic operation by operation (no fused multiply-add), so the
compiled and numpy paths give bit-identical rows.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "downpour.sparse._native",
            sources=["downpour/sparse/_native.c"],
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno"],
            optional=True,
        )
    ]
)
