"""Selects the lean front end: ``_lean.py`` compiled with Cython, or the same file as Python.

``_lean.pxd`` types the compiled build's classes; the source is one file either way.
The switch is ``compat.USE_EXTENSIONS``: ``FASTINGEST_NO_EXTENSIONS=1`` runs the source
even where a compiled build is installed, which is how the tests run both.
"""

from __future__ import annotations

import importlib.util
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from types import ModuleType

from fastingest.compat import USE_EXTENSIONS


def _source() -> ModuleType:
    """``_lean.py`` itself, under its own name: the compiled module shadows the file."""
    name = "fastingest._lean_py"
    if name not in sys.modules:
        source = Path(__file__).with_name("_lean.py")
        spec = importlib.util.spec_from_file_location(name, source)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


if USE_EXTENSIONS:
    from fastingest import _lean as impl  # the source itself where nothing was compiled
else:
    impl = _source()

COMPILED: bool = impl.__file__ is not None and impl.__file__.endswith(tuple(EXTENSION_SUFFIXES))
LeanFront = impl.LeanFront

__all__ = ["COMPILED", "LeanFront"]
