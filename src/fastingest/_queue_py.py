"""Pure-Python twin of ``fastingest._queue``: the specification and the fallback.

Same semantics as the compiled core, item for item and exception for exception;
every queue test runs against both. One ``threading.Lock`` plays the role of the
C mutex, two conditions the role of the pthread condition variables, and
asyncio waiters are futures in deques, woken exactly as in the compiled code.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from fastingest.errors import QueueClosed, QueueEmpty, QueueFull

T = TypeVar("T")

_get_running_loop = asyncio.events._get_running_loop
_MAIN_THREAD_ID = threading.main_thread().ident
_MAIN_THREAD_SLICE = 0.1  # the main thread wakes this often so signal handlers can run

# Result codes of the push helpers, as in _queue.pyx.
PUSHED, FULL, CLOSED = 0, 1, 2


def item_size(item: object) -> int:
    """Bytes charged for `item`: len() of bytes-like items, 0 for anything else."""
    if isinstance(item, (bytes, bytearray)):
        return len(item)
    if isinstance(item, memoryview):
        return item.nbytes
    return 0


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _wake_one(waiters: deque[asyncio.Future[None]]) -> bool:
    """Wake the oldest live asyncio waiter; True if one was woken."""
    while waiters:
        fut = waiters.popleft()
        if fut.done():
            continue
        loop = fut.get_loop()
        if loop is _get_running_loop():
            fut.set_result(None)
        else:
            try:
                loop.call_soon_threadsafe(_resolve, fut)
            except RuntimeError:  # that loop is closed; its task is gone
                continue
        return True
    return False


def _abandon(waiters: deque[asyncio.Future[None]], fut: asyncio.Future[None]) -> None:
    """A task leaves `waiters` without waiting (cancelled, or served at once): forget it,
    and pass on the wake-up it got. A future no longer in the line was taken by a waker,
    whose wake-up may still be on its way from another thread (so not done yet)."""
    try:
        waiters.remove(fut)
    except ValueError:
        _wake_one(waiters)


class RingQueue(Generic[T]):
    """Bounded FIFO of Python objects, by count and optionally by bytes."""

    def __init__(self, maxsize: int, max_bytes: int | None = None) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1 or None, got {max_bytes}")
        self._maxsize = maxsize
        self._max_bytes = -1 if max_bytes is None else max_bytes
        self._items: deque[tuple[T, int]] = deque()
        self._nbytes = 0
        self._closed = False
        self._enqueued = self._dequeued = self._rejected = self._high_water = 0
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._getters: deque[asyncio.Future[None]] = deque()
        self._putters: deque[asyncio.Future[None]] = deque()

    # --- internal (caller holds self._lock) ---------------------------------

    def _fits(self, size: int) -> bool:
        return len(self._items) < self._maxsize and (
            self._max_bytes < 0 or self._nbytes + size <= self._max_bytes
        )

    def _push(self, item: T, size: int) -> None:
        self._items.append((item, size))
        self._nbytes += size
        self._enqueued += 1
        self._high_water = max(self._high_water, len(self._items))
        self._not_empty.notify()

    def _pop(self) -> T:
        item, size = self._items.popleft()
        self._nbytes -= size
        self._dequeued += 1
        if self._max_bytes < 0:
            self._not_full.notify()
        else:
            self._not_full.notify_all()
        return item

    # --- internal (no lock) ---------------------------------------------------

    def _checked_size(self, item: object) -> int:
        size = item_size(item)
        if 0 <= self._max_bytes < size:
            raise ValueError(f"item of {size} bytes can never fit max_bytes={self._max_bytes}")
        return size

    def _try_put(self, item: T, size: int, final: bool) -> int:
        """PUSHED, FULL or CLOSED; `final`: count a refusal as rejected."""
        with self._lock:
            if self._closed:
                return CLOSED
            if not self._fits(size):
                self._rejected += final
                return FULL
            self._push(item, size)
        if self._getters:
            _wake_one(self._getters)
        return PUSHED

    def _try_get(self) -> tuple[bool, T | None, bool]:
        with self._lock:
            if self._items:
                item = self._pop()
                got = True
            else:
                item, got = None, False
            closed = self._closed
        if got and self._putters:
            _wake_one(self._putters)
        return got, item, closed

    # --- non-blocking -----------------------------------------------------------

    def put_nowait(self, item: T) -> None:
        rc = self._try_put(item, self._checked_size(item), True)
        if rc == FULL:
            raise QueueFull()
        if rc == CLOSED:
            raise QueueClosed("queue is closed")

    def get_nowait(self) -> T:
        got, item, closed = self._try_get()
        if got:
            return item  # type: ignore[return-value]
        if closed:
            raise QueueClosed("queue is closed and drained")
        raise QueueEmpty()

    def put_many(self, items: Iterable[T]) -> int:
        seq = list(items)
        sizes = [self._checked_size(item) for item in seq]
        taken = 0
        with self._lock:
            closed = self._closed
            if not closed:
                while taken < len(seq) and self._fits(sizes[taken]):
                    self._push(seq[taken], sizes[taken])
                    taken += 1
                self._rejected += len(seq) - taken
        if closed:
            raise QueueClosed("queue is closed")
        for _ in range(taken):
            if not _wake_one(self._getters):
                break
        return taken

    def get_many(self, max_items: int, max_bytes: int | None = None) -> list[T]:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        limit = -1 if max_bytes is None else max_bytes
        out: list[T] = []
        nbytes = 0
        with self._lock:
            while len(out) < max_items and self._items:
                size = self._items[0][1]
                if out and limit >= 0 and nbytes + size > limit:
                    break
                nbytes += size
                out.append(self._pop())
            closed = self._closed
        if not out and closed:
            raise QueueClosed("queue is closed and drained")
        for _ in out:
            if not _wake_one(self._putters):
                break
        return out

    # --- blocking (threads) -------------------------------------------------------

    def _deadline(self, timeout: float | None) -> float | None:
        if timeout is None:
            return None
        if timeout < 0:
            raise ValueError("timeout must be >= 0")
        return time.monotonic() + timeout

    @staticmethod
    def _wait(cond: threading.Condition, deadline: float | None) -> bool:
        """Wait on `cond` (lock held); False once `deadline` has passed."""
        if deadline is None:
            on_main = threading.get_ident() == _MAIN_THREAD_ID
            cond.wait(_MAIN_THREAD_SLICE if on_main else None)
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        cond.wait(left)
        return True

    def put(self, item: T, timeout: float | None = None) -> None:
        size = self._checked_size(item)
        deadline = self._deadline(timeout)
        with self._lock:
            while not self._closed and not self._fits(size):
                if not self._wait(self._not_full, deadline):
                    break
            if self._closed:
                raise QueueClosed("queue is closed")
            if not self._fits(size):
                self._rejected += 1
                raise QueueFull()
            self._push(item, size)
        if self._getters:
            _wake_one(self._getters)

    def get(self, timeout: float | None = None) -> T:
        deadline = self._deadline(timeout)
        with self._lock:
            while not self._items and not self._closed:
                if not self._wait(self._not_empty, deadline):
                    break
            if self._items:
                item = self._pop()
            elif self._closed:
                raise QueueClosed("queue is closed and drained")
            else:
                raise QueueEmpty()
        if self._putters:
            _wake_one(self._putters)
        return item

    # --- asyncio ------------------------------------------------------------------

    async def aput(self, item: T) -> None:
        size = self._checked_size(item)
        while True:
            rc = self._try_put(item, size, False)
            if rc == PUSHED:
                return
            if rc == CLOSED:
                raise QueueClosed("queue is closed")
            await self._park(self._putters, lambda: self._closed or self._fits(size))

    async def aget(self) -> T:
        while True:
            got, item, closed = self._try_get()
            if got:
                return item  # type: ignore[return-value]
            if closed:
                raise QueueClosed("queue is closed and drained")
            await self._park(self._getters, self._gettable)

    async def aget_many(self, max_items: int, max_bytes: int | None = None) -> list[T]:
        while True:
            items = self.get_many(max_items, max_bytes)
            if items:
                return items
            await self._park(self._getters, self._gettable)

    def _gettable(self) -> bool:
        return bool(self._items) or self._closed

    @staticmethod
    async def _park(waiters: deque[asyncio.Future[None]], ready: Callable[[], bool]) -> None:
        """Wait in `waiters` until the other side wakes this task.

        A thread may make room (or add an item) after the caller looked and before this
        task is in `waiters`, and then wakes nobody; so `ready()` is asked once more
        after registering, and a task that is ready does not wait.
        """
        fut = asyncio.get_running_loop().create_future()
        waiters.append(fut)
        try:
            if not ready():
                await fut
                return
        except BaseException:
            _abandon(waiters, fut)
            raise
        _abandon(waiters, fut)  # ready at once: out of the line, passing on any wake-up

    # --- lifecycle and introspection ------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()
        while _wake_one(self._getters):
            pass
        while _wake_one(self._putters):
            pass

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @property
    def max_bytes(self) -> int | None:
        return None if self._max_bytes < 0 else self._max_bytes

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def qsize(self) -> int:
        return len(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        with self._lock:
            return not self._fits(0) or (0 <= self._max_bytes <= self._nbytes)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "enqueued": self._enqueued,
                "dequeued": self._dequeued,
                "rejected": self._rejected,
                "high_water": self._high_water,
            }

    def __repr__(self) -> str:
        closed = " closed" if self._closed else ""
        return (
            f"<RingQueue {self.qsize()}/{self._maxsize} items, "
            f"{self.nbytes}/{self.max_bytes} bytes{closed}>"
        )


__all__ = ["RingQueue"]
