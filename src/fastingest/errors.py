"""Exceptions shared by the compiled queue core and its pure-Python twin."""

from __future__ import annotations


class QueueFull(Exception):
    """The queue holds ``maxsize`` items or ``max_bytes`` bytes; nothing was added."""


class QueueEmpty(Exception):
    """The queue holds no item; nothing was taken."""


class QueueClosed(Exception):
    """The queue was closed: puts are refused, and gets fail once it is drained."""
