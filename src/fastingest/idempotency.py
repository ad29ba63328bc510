"""``Idempotency-Key``: a retried request gets the first answer and is stored once.

Keys live in this process's memory for ``--idempotency-window`` seconds (at most
``MAX_KEYS`` of them, and ``MAX_BYTES`` of keys and answers together: the oldest go
first). A retry that arrives while the first attempt is still
running waits for its answer. Only successful answers are remembered: after a
4xx or 503 the retry is processed afresh.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

MAX_KEYS = 100_000
MAX_BYTES = 16 * 1024 * 1024
ENTRY_OVERHEAD = 200  # bytes an entry costs beside its key and answer (dict slot, future)
Remembered = tuple[int, bytes]  # an answer's status and JSON body


class IdempotencyCache:
    def __init__(self, window: float, max_keys: int = MAX_KEYS, max_bytes: int = MAX_BYTES) -> None:
        self.window = window
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self.nbytes = 0
        # key -> (expiry, answer future, bytes counted for it)
        self._entries: OrderedDict[str, tuple[float, asyncio.Future[Remembered], int]] = (
            OrderedDict()
        )

    def _expire(self) -> None:
        now = time.monotonic()
        while self._entries:
            key, (expires, _, size) = next(iter(self._entries.items()))
            full = len(self._entries) > self.max_keys or self.nbytes > self.max_bytes
            if expires > now and not full:
                break
            del self._entries[key]
            self.nbytes -= size

    def get(self, key: str) -> asyncio.Future[Remembered] | None:
        self._expire()
        entry = self._entries.get(key)
        return entry[1] if entry else None

    def begin(self, key: str) -> asyncio.Future[Remembered]:
        fut: asyncio.Future[Remembered] = asyncio.get_running_loop().create_future()
        size = len(key) + ENTRY_OVERHEAD
        self._entries[key] = (time.monotonic() + self.window, fut, size)
        self.nbytes += size
        return fut

    def finish(self, key: str, fut: asyncio.Future[Remembered], answer: Remembered | None) -> None:
        """Remember a 2xx `answer`; forget the key otherwise (None: the attempt failed)."""
        if answer is not None and 200 <= answer[0] < 300:
            fut.set_result(answer)
            if (entry := self._entries.get(key)) is not None and entry[1] is fut:
                self._entries[key] = (entry[0], fut, entry[2] + len(answer[1]))
                self.nbytes += len(answer[1])
            return
        if (entry := self._entries.get(key)) is not None and entry[1] is fut:
            del self._entries[key]
            self.nbytes -= entry[2]
        if answer is None:
            fut.cancel()
        else:
            fut.set_result(answer)
