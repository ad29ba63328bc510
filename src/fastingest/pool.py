"""The worker-channel pool of the "1 million requests per minute" design.

Go's ``chan chan Job`` built from compiled ``RingQueue``s: every worker owns a
one-slot channel and registers it in ``idle`` (a queue of channels) whenever it
is free; the dispatcher takes a job from the job queue, takes an idle channel,
and puts the job into it. So each job goes to exactly one worker, and at most
``max_workers`` jobs run at once.

Workers are asyncio tasks when ``handler`` is a coroutine function (the
server's case) and threads otherwise. A handler that raises is logged and
counted, and ``on_error`` (if given) receives the job, so nothing is dropped
silently; the worker carries on with the next job.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from fastingest.errors import QueueClosed, QueueEmpty
from fastingest.queue import RingQueue

T = TypeVar("T")

log = logging.getLogger("fastingest.pool")

# A dispatcher thread blocked on an empty job queue looks at stop requests this often;
# asyncio dispatchers are woken directly and never poll.
_THREAD_STOP_POLL = 0.05


class WorkerPool(Generic[T]):
    """Hands each job from `queue` to one idle worker running `handler(job)`.

    Thread mode (plain `handler`): ``start()``, then ``stop(drain)`` blocks.
    Asyncio mode (coroutine `handler`): ``start()`` inside a running loop, then
    ``await stop(drain)``.

    ``stop(drain=True)`` closes `queue`, dispatches every job left in it, waits
    for the workers to finish, then ends them. ``stop(drain=False)`` stops
    dispatching at once and waits only for jobs already handed to a worker;
    the rest stay in `queue` (handed back) for whoever reads it next.
    """

    def __init__(
        self,
        max_workers: int,
        handler: Callable[[T], Awaitable[object]] | Callable[[T], object],
        queue: RingQueue[T],
        *,
        on_error: Callable[[T, BaseException], object] | None = None,
        name: str = "fastingest-worker",
    ) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.max_workers = max_workers
        self.handler = handler
        self.queue = queue
        self.on_error = on_error
        self.name = name
        self.is_async = inspect.iscoroutinefunction(handler)
        self.handled = 0  # jobs whose handler returned
        self.failed = 0  # jobs whose handler raised
        self._idle: RingQueue[RingQueue[T]] = RingQueue(max_workers)
        self._channels: list[RingQueue[T]] = []
        self._workers: list[asyncio.Task[None] | threading.Thread] = []
        self._dispatcher: asyncio.Task[None] | threading.Thread | None = None
        self._dispatcher_idle = False  # blocked on an empty job queue: safe to cancel
        self._holding: list[T] = []  # the job the dispatcher took but has not handed over yet
        self._stop_dispatching = False
        self._lock = threading.Lock()  # guards the counters in thread mode

    @property
    def idle(self) -> int:
        """Workers waiting for a job."""
        return self._idle.qsize()

    @property
    def busy(self) -> int:
        """Workers running the handler (or about to register as idle again)."""
        return len(self._workers) - self._idle.qsize() if self._dispatcher else 0

    @property
    def running(self) -> bool:
        return self._dispatcher is not None

    def start(self) -> None:
        if self._dispatcher is not None:
            raise RuntimeError("pool already started")
        self._channels = [RingQueue(1) for _ in range(self.max_workers)]
        if self.is_async:
            loop = asyncio.get_running_loop()
            self._workers = [
                loop.create_task(self._aworker(ch), name=f"{self.name}-{i}")
                for i, ch in enumerate(self._channels)
            ]
            self._dispatcher = loop.create_task(self._adispatch(), name=f"{self.name}-dispatch")
        else:
            threads = [
                threading.Thread(
                    target=self._worker, args=(ch,), name=f"{self.name}-{i}", daemon=True
                )
                for i, ch in enumerate(self._channels)
            ]
            self._workers = list(threads)
            self._dispatcher = threading.Thread(
                target=self._dispatch, name=f"{self.name}-dispatch", daemon=True
            )
            for t in threads:
                t.start()
            self._dispatcher.start()

    def stop(self, drain: bool = True) -> Awaitable[None] | None:
        """Stop the pool; see the class docstring. Awaitable in asyncio mode."""
        if self._dispatcher is None:
            raise RuntimeError("pool not started")
        if drain:
            self.queue.close()
        else:
            self._stop_dispatching = True
        if self.is_async:
            return self._astop()
        assert isinstance(self._dispatcher, threading.Thread)
        self._dispatcher.join()
        self._end_workers()
        for t in self._workers:
            assert isinstance(t, threading.Thread)
            t.join()
        return None

    def _end_workers(self) -> None:
        # The dispatcher is gone, so no channel gets another job: closing one
        # lets its worker finish the job it holds, then leave.
        for ch in self._channels:
            ch.close()

    async def _astop(self) -> None:
        assert isinstance(self._dispatcher, asyncio.Task)
        if self._stop_dispatching and self._dispatcher_idle:
            self._dispatcher.cancel()
        await asyncio.gather(self._dispatcher, return_exceptions=True)
        self._end_workers()
        await asyncio.gather(*(t for t in self._workers if isinstance(t, asyncio.Task)))

    async def abort(self) -> list[T]:
        """Asyncio mode: cancel the dispatcher and every worker now.

        Returns the jobs the pool held but no handler had started (in worker
        channels, or taken by the dispatcher); jobs whose handler was running
        are the handler's to account for (it sees CancelledError). Jobs still
        in `queue` stay there.
        """
        if not self.is_async or self._dispatcher is None:
            raise RuntimeError("abort() is for a started asyncio pool")
        tasks = [self._dispatcher, *self._workers]
        for task in tasks:
            task.cancel()  # type: ignore[union-attr]
        await asyncio.gather(*tasks, return_exceptions=True)  # type: ignore[arg-type]
        left = list(self._holding)
        self._holding.clear()
        for ch in self._channels:
            ch.close()
            left += ch.get_many(1) if ch.qsize() else []
        return left

    # --- asyncio mode ---------------------------------------------------------

    async def _adispatch(self) -> None:
        queue, idle = self.queue, self._idle
        while not self._stop_dispatching:
            try:
                job = queue.get_nowait()
            except QueueEmpty:
                self._dispatcher_idle = True
                try:
                    job = await queue.aget()
                except asyncio.CancelledError:
                    if self._stop_dispatching:
                        return
                    raise
                except QueueClosed:
                    return
                finally:
                    self._dispatcher_idle = False
            except QueueClosed:
                return
            self._holding.append(job)
            channel = await idle.aget()
            channel.put_nowait(job)  # never full: the worker registered it empty
            self._holding.clear()

    async def _aworker(self, channel: RingQueue[T]) -> None:
        handler = self.handler
        while True:
            self._idle.put_nowait(channel)  # never full: one slot per worker
            try:
                job = await channel.aget()
            except QueueClosed:
                return
            try:
                await handler(job)  # type: ignore[misc]
                self.handled += 1
            except Exception as exc:
                self._failed(job, exc)

    # --- thread mode ------------------------------------------------------------

    def _dispatch(self) -> None:
        queue, idle = self.queue, self._idle
        while not self._stop_dispatching:
            try:
                job = queue.get(timeout=_THREAD_STOP_POLL)
            except QueueEmpty:
                continue
            except QueueClosed:
                return
            idle.get().put_nowait(job)

    def _worker(self, channel: RingQueue[T]) -> None:
        handler = self.handler
        while True:
            self._idle.put_nowait(channel)
            try:
                job = channel.get()
            except QueueClosed:
                return
            try:
                handler(job)
                with self._lock:
                    self.handled += 1
            except Exception as exc:
                self._failed(job, exc)

    def _failed(self, job: T, exc: Exception) -> None:
        with self._lock:
            self.failed += 1
        log.error("handler failed on a job: %r", exc, exc_info=exc)
        if self.on_error is not None:
            try:
                self.on_error(job, exc)
            except Exception:
                log.exception("on_error failed too; the job is only in this log")
