"""Selects the queue implementation: the compiled core, or its pure-Python twin (see
``compat``)."""

from __future__ import annotations

from fastingest.compat import USE_EXTENSIONS

if USE_EXTENSIONS:
    from fastingest._queue import RingQueue
else:
    from fastingest._queue_py import RingQueue  # type: ignore[assignment]

__all__ = ["USE_EXTENSIONS", "RingQueue"]
