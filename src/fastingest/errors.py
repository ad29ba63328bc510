"""Exceptions shared across modules: the queue core's (compiled and twin) and a refusal."""

from __future__ import annotations

from typing import Any


class QueueFull(Exception):
    """The queue holds ``maxsize`` items or ``max_bytes`` bytes; nothing was added."""


class QueueEmpty(Exception):
    """The queue holds no item; nothing was taken."""


class QueueClosed(Exception):
    """The queue was closed: puts are refused, and gets fail once it is drained."""


class Refusal(Exception):
    """A request refused: its HTTP status, a short code, a sentence, and where in the body.

    Both front ends answer it the same way (``endpoints.refusal``).
    """

    def __init__(self, status: int, error: str, detail: str, **where: int | str) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.where = where

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "detail": self.detail, **self.where}
