"""Declares the compiled cores; everything else lives in pyproject.toml.

FASTINGEST_NO_EXTENSIONS=1 at build time skips the compiler and ships only the
pure-Python twins (``fastingest._queue_py``, ``fastingest._split_py``,
``fastingest._columns_py``) and runs
``fastingest/_lean.py`` as Python.
"""

import os

from setuptools import Extension, setup

ext_modules = []
if os.environ.get("FASTINGEST_NO_EXTENSIONS", "") in ("", "0"):
    from Cython.Build import cythonize

    ext_modules = cythonize(
        [
            Extension(
                "fastingest._queue",
                ["src/fastingest/_queue.pyx"],
                include_dirs=["src/fastingest"],  # _await.h
                extra_compile_args=["-O2"],
            ),
            Extension(
                "fastingest._split",
                ["src/fastingest/_split.pyx"],
                include_dirs=["src/fastingest"],  # _scan.h
                extra_compile_args=["-O2"],
            ),
            Extension(
                "fastingest._columns",
                ["src/fastingest/_columns.pyx"],
                include_dirs=["src/fastingest"],  # _scan.h
                extra_compile_args=["-O2"],
            ),
            # Plain Python typed by _lean.pxd: the file also runs uncompiled.
            Extension(
                "fastingest._lean",
                ["src/fastingest/_lean.py"],
                extra_compile_args=["-O2"],
            ),
        ],
        compiler_directives={"language_level": "3", "embedsignature": True},
    )

setup(ext_modules=ext_modules)
