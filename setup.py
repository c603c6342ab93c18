"""Builds the compiled kernels: the sparse table's and the servers' dense update rules; everything else
about the package is in pyproject.toml.

Each extension needs only a C compiler and Python.h (arrays arrive through the buffer protocol or as
addresses, so no numpy or torch headers). Both are optional: where one cannot be built, install goes
on and the package uses numpy (sparse tables) or torch (dense rules), which is slower; the build then
prints a banner, and a server logs which path it takes (summary.json's ``sparse_kernel``, a server's
stats' ``dense_kernel``). -ffp-contract=off keeps float32 arithmetic operation by operation (no fused
multiply-add but the explicit fmaf() calls), so the compiled and fallback paths give bit-identical values.
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
                             "! The slower numpy/torch path will run instead. Install a C compiler and\n"
                             f"! Python's headers (e.g. apt-get install gcc python3-dev) and reinstall.\n{bar}\n\n")


setup(
    cmdclass={"build_ext": LoudBuildExt},
    ext_modules=[
        Extension(
            "downpour.sparse._native",
            sources=["downpour/sparse/_native.c"],
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno"],
            optional=True,
        ),
        Extension(
            "downpour.server._dense",
            sources=["downpour/server/_dense.c"],
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno"],
            optional=True,
        ),
    ],
)
