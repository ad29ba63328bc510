"""Selects the collection splitter: the compiled one, or its pure-Python twin.

The same switch as the queue's (``queue.USE_EXTENSIONS``): ``FASTINGEST_NO_EXTENSIONS=1``
forces the twins, and so does a build without a compiler.
"""

from __future__ import annotations

from fastingest.queue import USE_EXTENSIONS

if USE_EXTENSIONS:
    try:
        from fastingest._split import split_payloads
    except ImportError:  # a build from before the splitter was compiled
        from fastingest._split_py import split_payloads
else:
    from fastingest._split_py import split_payloads

__all__ = ["split_payloads"]
