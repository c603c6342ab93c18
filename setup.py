"""Builds the sparse table's compiled kernels; everything else about the package is in pyproject.toml.

The extension needs only a C compiler and Python.h (arrays arrive through the buffer protocol, so no
numpy headers). It is optional: where it cannot be built, install goes on and the table uses numpy,
which is slower; the build then prints a banner, every server with a sparse table logs a warning,
and summary.json's ``sparse_kernel`` says why. -ffp-contract=off keeps float32 arithmetic operation
by operation (no fused multiply-add), so the compiled and numpy paths give bit-identical rows.
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class LoudBuildExt(build_ext):
    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as err:  # setuptools' optional=True would only whisper
            bar = "!" * 78
            sys.stderr.write(f"\n{bar}\n! downpour: the C kernel {ext.name} was NOT built ({err}).\n"
                             "! Sparse tables will use the slower numpy path. Install a C compiler and\n"
                             f"! Python's headers (e.g. apt-get install gcc python3-dev) and reinstall.\n{bar}\n\n")


setup(
    cmdclass={"build_ext": LoudBuildExt},
    ext_modules=[
        Extension(
            "downpour.sparse._native",
            sources=["downpour/sparse/_native.c"],
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno"],
            optional=True,
        )
    ],
)
