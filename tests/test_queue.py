"""RingQueue behaviour, run against the compiled core and the pure-Python twin."""

from __future__ import annotations

import asyncio
import functools
import gc
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from fastingest import QueueClosed, QueueEmpty, QueueFull


def test_fifo_and_count_bound(RingQueue):
    q = RingQueue(3)
    for i in range(3):
        q.put_nowait(i)
    assert q.full() and len(q) == 3 and q.qsize() == 3
    with pytest.raises(QueueFull):
        q.put_nowait(3)
    assert [q.get_nowait() for _ in range(3)] == [0, 1, 2]
    assert q.empty()
    with pytest.raises(QueueEmpty):
        q.get_nowait()
    assert q.stats() == {"enqueued": 3, "dequeued": 3, "rejected": 1, "high_water": 3}


def test_wraps_around_many_times(RingQueue):
    q = RingQueue(4)
    out = []
    for i in range(100):
        q.put_nowait(i)
        if i % 3 == 2:
            out.extend(q.get_many(10))
    out.extend(q.get_many(10))
    assert out == list(range(100))


def test_byte_bound(RingQueue):
    q = RingQueue(100, max_bytes=10)
    assert q.max_bytes == 10 and q.maxsize == 100
    q.put_nowait(b"12345")
    q.put_nowait(bytearray(b"1234"))
    assert q.nbytes == 9
    with pytest.raises(QueueFull):
        q.put_nowait(b"xy")
    q.put_nowait(memoryview(b"z"))
    assert q.nbytes == 10 and q.full()
    q.put_nowait("strings and other objects weigh nothing")
    assert q.get_nowait() == b"12345"
    assert q.nbytes == 5
    q.put_nowait(b"abcde")
    assert q.nbytes == 10


def test_item_larger_than_max_bytes_is_a_value_error(RingQueue):
    q = RingQueue(10, max_bytes=4)
    with pytest.raises(ValueError, match="can never fit"):
        q.put_nowait(b"12345")
    with pytest.raises(ValueError):
        q.put_many([b"1", b"12345"])
    assert q.qsize() == 0  # put_many checked every item before taking any


@pytest.mark.parametrize(("maxsize", "max_bytes"), [(0, None), (-1, None), (1, 0)])
def test_bad_arguments(RingQueue, maxsize, max_bytes):
    with pytest.raises(ValueError):
        RingQueue(maxsize, max_bytes)


def test_put_many_takes_the_prefix_that_fits(RingQueue):
    q = RingQueue(5, max_bytes=6)
    assert q.put_many([b"ab", b"cd", b"ef", b"g"]) == 3
    assert q.stats()["rejected"] == 1
    assert q.put_many(iter([])) == 0
    assert q.get_many(2) == [b"ab", b"cd"]
    assert q.put_many(x for x in [b"h", b"i"]) == 2
    assert q.get_many(100) == [b"ef", b"h", b"i"]


def test_get_many_respects_max_bytes_but_always_takes_one(RingQueue):
    q = RingQueue(10)
    q.put_many([b"aaaa", b"bb", b"cc", b"d"])
    assert q.get_many(10, max_bytes=3) == [b"aaaa"]
    assert q.get_many(10, max_bytes=5) == [b"bb", b"cc", b"d"]
    assert q.get_many(10) == []
    with pytest.raises(ValueError):
        q.get_many(0)


def test_close_drains_then_raises(RingQueue):
    q = RingQueue(4)
    q.put_many([1, 2, 3])
    q.close()
    assert q.closed
    with pytest.raises(QueueClosed):
        q.put_nowait(4)
    with pytest.raises(QueueClosed):
        q.put_many([4])
    assert q.get_nowait() == 1
    assert q.get_many(10) == [2, 3]
    for take in (q.get_nowait, lambda: q.get_many(1), lambda: q.get(timeout=0.01)):
        with pytest.raises(QueueClosed):
            take()


def test_blocking_timeouts(RingQueue):
    q = RingQueue(1)
    with pytest.raises(QueueEmpty):
        q.get(timeout=0.02)
    q.put(1, timeout=0)
    with pytest.raises(QueueFull):
        q.put(2, timeout=0.02)
    assert q.stats()["rejected"] == 1
    with pytest.raises(ValueError):
        q.put(2, timeout=-1)
    assert q.get(timeout=0) == 1


def test_close_wakes_blocked_threads(RingQueue):
    empty, full = RingQueue(1), RingQueue(1)
    full.put_nowait(0)
    errors = []

    def wait(fn):
        try:
            fn()
        except QueueClosed as exc:
            errors.append(exc)

    threads = [threading.Thread(target=wait, args=(empty.get,)) for _ in range(3)]
    threads += [threading.Thread(target=wait, args=(lambda: full.put(1),)) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    empty.close()
    full.close()
    for t in threads:
        t.join(5)
        assert not t.is_alive()
    assert len(errors) == 6


def test_blocked_get_releases_the_gil(RingQueue):
    q = RingQueue(1)
    waiter = threading.Thread(target=q.get)
    waiter.start()
    time.sleep(0.02)
    # While the waiter sits in get(), this thread must keep running Python code.
    spins, deadline = 0, time.monotonic() + 0.2
    while time.monotonic() < deadline:
        spins += 1
    assert waiter.is_alive()
    assert spins > 10_000
    q.put_nowait("wake")
    waiter.join(5)
    assert not waiter.is_alive()


def test_blocked_put_wakes_when_a_byte_budget_frees(RingQueue):
    q = RingQueue(10, max_bytes=4)
    q.put_nowait(b"1234")
    done = threading.Event()

    def put_big():
        q.put(b"abc")
        done.set()

    t = threading.Thread(target=put_big)
    t.start()
    assert not done.wait(0.05)
    assert q.get_nowait() == b"1234"
    assert done.wait(5)
    t.join()
    assert q.get_nowait() == b"abc"


def test_refcounts_return_to_baseline(RingQueue):
    item = object()
    base = sys.getrefcount(item)
    q = RingQueue(8)
    q.put_nowait(item)
    q.put(item)
    q.put_many([item, item])
    assert sys.getrefcount(item) == base + 4
    assert q.get_nowait() is item
    assert q.get() is item
    assert q.get_many(10) == [item, item]
    assert sys.getrefcount(item) == base
    small = RingQueue(1)
    assert small.put_many([item, item]) == 1  # the refused one keeps no reference
    assert sys.getrefcount(item) == base + 1
    del small
    gc.collect()
    assert sys.getrefcount(item) == base


def test_items_left_in_closed_or_dropped_queue_are_released(RingQueue):
    item = object()
    base = sys.getrefcount(item)
    q = RingQueue(4)
    q.put_many([item, item, item])
    q.close()
    del q
    gc.collect()
    assert sys.getrefcount(item) == base
    q = RingQueue(2)
    for _ in range(10):  # wrap the ring so the dealloc walks across the end
        q.put_nowait(item)
        q.get_nowait()
    q.put_many([item, item])
    del q
    gc.collect()
    assert sys.getrefcount(item) == base


def test_full_put_nowait_keeps_no_reference(RingQueue):
    item = object()
    base = sys.getrefcount(item)
    q = RingQueue(1)
    q.put_nowait(1)
    for _ in range(5):
        with pytest.raises(QueueFull):
            q.put_nowait(item)
        with pytest.raises(QueueFull):
            q.put(item, timeout=0)
    assert sys.getrefcount(item) == base


def test_generic_alias_and_repr(RingQueue):
    assert RingQueue[bytes].__origin__ is RingQueue  # subscriptable for type hints
    q = RingQueue(2, max_bytes=8)
    q.put_nowait(b"abc")
    assert "1/2 items" in repr(q) and "3/8 bytes" in repr(q)


# --- asyncio ---------------------------------------------------------------------


def test_async_put_get_and_backpressure(RingQueue):
    async def main():
        q = RingQueue(2)
        got = []

        async def producer():
            for i in range(50):
                await q.aput(i)
            q.close()

        async def consumer():
            try:
                while True:
                    got.append(await q.aget())
                    await asyncio.sleep(0)
            except QueueClosed:
                pass

        await asyncio.wait_for(asyncio.gather(producer(), consumer()), 10)
        assert got == list(range(50))
        assert q.stats()["high_water"] == 2

    asyncio.run(main())


def test_aget_many_waits_for_at_least_one(RingQueue):
    async def main():
        q = RingQueue(10)
        task = asyncio.ensure_future(q.aget_many(5, max_bytes=4))
        await asyncio.sleep(0.01)
        assert not task.done()
        q.put_many([b"ab", b"cd", b"e"])
        assert await asyncio.wait_for(task, 5) == [b"ab", b"cd"]
        assert await q.aget_many(5) == [b"e"]
        q.close()
        with pytest.raises(QueueClosed):
            await q.aget_many(5)

    asyncio.run(main())


def test_close_wakes_async_waiters(RingQueue):
    async def main():
        empty, full = RingQueue(1), RingQueue(1)
        full.put_nowait(0)
        waiters = [asyncio.ensure_future(empty.aget()) for _ in range(3)]
        waiters += [asyncio.ensure_future(full.aput(1)) for _ in range(3)]
        waiters.append(asyncio.ensure_future(empty.aget_many(3)))
        await asyncio.sleep(0.01)
        empty.close()
        full.close()
        results = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 5)
        assert all(isinstance(r, QueueClosed) for r in results)

    asyncio.run(main())


@pytest.mark.parametrize("waker", ["this loop", "a thread"])
def test_cancelled_getter_passes_its_wakeup_on(RingQueue, waker):
    async def main():
        q = RingQueue(4)
        first = asyncio.ensure_future(q.aget())
        second = asyncio.ensure_future(q.aget())
        await asyncio.sleep(0.01)
        if waker == "this loop":
            q.put_nowait("x")  # wakes `first`...
        else:  # its wake-up of `first` waits in the loop's queue, not run yet
            putter = threading.Thread(target=q.put_nowait, args=("x",))
            putter.start()
            putter.join()
        first.cancel()  # ...which is cancelled before it runs
        assert await asyncio.wait_for(second, 5) == "x"
        assert q.qsize() == 0

    asyncio.run(main())


class _Interleaved(asyncio.SelectorEventLoop):
    """A loop that runs `between` the next time a task makes a future: where another
    thread's put or get can land while a task is on its way into the waiters' line."""

    between: Callable[[], object] | None = None

    def create_future(self) -> asyncio.Future[Any]:
        if (between := self.between) is not None:
            self.between = None
            between()
        return super().create_future()


@pytest.mark.parametrize("side", ["aput", "aget", "aget_many"])
def test_room_or_an_item_that_comes_as_a_task_gets_in_line_is_not_missed(RingQueue, side):
    q = RingQueue(1)
    loop = _Interleaved()
    if side == "aput":
        q.put_nowait("old")
        loop.between = q.get_nowait  # room, while the putter is on its way to wait for it
        waiting = q.aput("new")
    else:
        loop.between = functools.partial(q.put_nowait, "new")
        waiting = q.aget() if side == "aget" else q.aget_many(4)
    try:
        task = loop.create_task(waiting)  # no future made before the queue's own
        loop.call_later(5, task.cancel)  # missed: CancelledError
        got = loop.run_until_complete(task)
    finally:
        loop.close()
    assert got == {"aput": None, "aget": "new", "aget_many": ["new"]}[side]
    if side == "aput":
        assert q.get_nowait() == "new"


def test_thread_wakes_async_getter_on_another_loop(RingQueue):
    async def main():
        q = RingQueue(4)
        task = asyncio.ensure_future(q.aget())
        await asyncio.sleep(0.01)
        threading.Thread(target=q.put, args=("from a thread",)).start()
        assert await asyncio.wait_for(task, 5) == "from a thread"

    asyncio.run(main())


def test_async_put_wakes_thread_getter(RingQueue):
    q = RingQueue(1)
    got = []
    t = threading.Thread(target=lambda: got.append(q.get(timeout=5)))
    t.start()
    time.sleep(0.02)

    async def main():
        await q.aput("to a thread")

    asyncio.run(main())
    t.join(5)
    assert got == ["to a thread"]


def test_async_waiters_on_two_loops(RingQueue):
    """Getters on two loops in two threads, one putter thread: every item once."""
    q = RingQueue(8)
    n, got, lock = 2000, [], threading.Lock()

    def consumer():
        async def main():
            try:
                while True:
                    item = await q.aget()
                    with lock:
                        got.append(item)
            except QueueClosed:
                pass

        asyncio.run(main())

    threads = [threading.Thread(target=consumer) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(n):
        q.put(i, timeout=5)
    q.close()
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert sorted(got) == list(range(n))


def test_async_operations_are_lazy_coroutines(RingQueue):
    """aget()/aput() do nothing until awaited, and asyncio takes them as coroutines."""

    async def main():
        q = RingQueue(2)
        q.put_nowait("first")
        pending = q.aget()  # not awaited: takes nothing
        assert q.qsize() == 1
        pending.close()
        q.aput("never").close()
        assert q.qsize() == 1
        # A task cancelled before its first step took nothing either.
        task = asyncio.create_task(q.aget())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert q.qsize() == 1
        assert await asyncio.wait_for(q.aget(), 1) == "first"
        assert await asyncio.create_task(q.aput("second")) is None
        assert await asyncio.ensure_future(q.aget()) == "second"
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(q.aget(), 0.01)  # the waiting path, then cancelled
        q.put_nowait("third")
        assert await q.aget() == "third"  # nothing was lost by that cancellation

    asyncio.run(main())


def test_an_awaited_operation_cannot_be_reused(RingQueue):
    async def main():
        q = RingQueue(2)
        q.put_nowait(1)
        op = q.aget()
        assert await op == 1
        with pytest.raises(RuntimeError):
            await op

    asyncio.run(main())


def test_operations_answer_the_python_coroutine_protocol(RingQueue):
    """send() and __next__ step an operation as they step a coroutine.

    Tasks and ``await`` use the C-level send; Cython-compiled coroutines, and code
    that drives a coroutine by hand, go through these two, which once handed back
    a NULL result (SystemError, or a crash when the operation finished).
    """

    async def main():
        q = RingQueue(1)
        ready = q.aput("a").__await__()  # room: it finishes on its first step
        with pytest.raises(StopIteration) as stop:
            ready.send(None)
        assert stop.value.value is None
        with pytest.raises(StopIteration) as stop:
            next(q.aget().__await__())
        assert stop.value.value == "a"

        getting = q.aget().__await__()  # empty: it waits on a future
        waiting_on = next(getting)
        assert asyncio.isfuture(waiting_on) and not waiting_on.done()
        q.put_nowait("b")
        await asyncio.sleep(0)  # the put wakes the getter's future
        with pytest.raises(StopIteration) as stop:
            getting.send(None)
        assert stop.value.value == "b"

        q.put_nowait("c")
        putting = q.aput("d").__await__()  # full: it waits for room
        assert asyncio.isfuture(putting.send(None))
        assert q.get_nowait() == "c"
        await asyncio.sleep(0)
        with pytest.raises(StopIteration):
            next(putting)
        assert q.get_nowait() == "d"

    asyncio.run(main())
