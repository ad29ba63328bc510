"""``Idempotency-Key``: a retried request gets the first answer and is stored once.

Keys live in this process's memory for ``--idempotency-window`` seconds (at most
``MAX_KEYS`` of them). A retry that arrives while the first attempt is still
running waits for its answer. Only successful answers are remembered: after a
4xx or 503 the retry is processed afresh.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

MAX_KEYS = 100_000
Remembered = tuple[int, bytes]  # an answer's status and JSON body


class IdempotencyCache:
    def __init__(self, window: float, max_keys: int = MAX_KEYS) -> None:
        self.window = window
        self.max_keys = max_keys
        self._entries: OrderedDict[str, tuple[float, asyncio.Future[Remembered]]] = OrderedDict()

    def _expire(self) -> None:
        now = time.monotonic()
        while self._entries:
            key, (expires, _) = next(iter(self._entries.items()))
            if expires > now and len(self._entries) <= self.max_keys:
                break
            del self._entries[key]

    def get(self, key: str) -> asyncio.Future[Remembered] | None:
        self._expire()
        entry = self._entries.get(key)
        return entry[1] if entry else None

    def begin(self, key: str) -> asyncio.Future[Remembered]:
        fut: asyncio.Future[Remembered] = asyncio.get_running_loop().create_future()
        self._entries[key] = (time.monotonic() + self.window, fut)
        return fut

    def finish(self, key: str, fut: asyncio.Future[Remembered], answer: Remembered | None) -> None:
        """Remember a 2xx `answer`; forget the key otherwise (None: the attempt failed)."""
        if answer is not None and 200 <= answer[0] < 300:
            fut.set_result(answer)
            return
        self._entries.pop(key, None)
        if answer is None:
            fut.cancel()
        else:
            fut.set_result(answer)
