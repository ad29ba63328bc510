"""Selects the queue implementation: the compiled core, or its pure-Python twin.

``FASTINGEST_NO_EXTENSIONS=1`` forces the twin; so does a build without a compiler.
"""

from __future__ import annotations

import os

USE_EXTENSIONS: bool = os.environ.get("FASTINGEST_NO_EXTENSIONS", "") in ("", "0")

if USE_EXTENSIONS:
    try:
        from fastingest._queue import RingQueue
    except ImportError:  # built without a compiler
        USE_EXTENSIONS = False

if not USE_EXTENSIONS:
    from fastingest._queue_py import RingQueue  # type: ignore[assignment]

__all__ = ["USE_EXTENSIONS", "RingQueue"]
