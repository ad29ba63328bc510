"""WorkerPool: each job to exactly one worker, bounded concurrency, drain, failures."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter

import pytest

from fastingest import WorkerPool


@pytest.fixture
def pool_cls(RingQueue, monkeypatch):
    """WorkerPool whose channels use the same implementation as the job queue."""
    import fastingest.pool

    monkeypatch.setattr(fastingest.pool, "RingQueue", RingQueue)
    return WorkerPool


class Tracker:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.handled: Counter = Counter()
        self.workers: set[str] = set()
        self.running = 0
        self.peak = 0

    def enter(self, job, who: str) -> None:
        with self.lock:
            self.handled[job] += 1
            self.workers.add(who)
            self.running += 1
            self.peak = max(self.peak, self.running)

    def leave(self) -> None:
        with self.lock:
            self.running -= 1


def test_async_pool_each_job_once_and_bounded(RingQueue, pool_cls):
    track = Tracker()

    async def handler(job):
        track.enter(job, asyncio.current_task().get_name())
        await asyncio.sleep(0.001 * (job % 3))
        track.leave()

    async def main():
        q = RingQueue(64)
        pool = pool_cls(4, handler, q)
        assert pool.is_async
        pool.start()
        assert pool.running
        for job in range(300):
            await q.aput(job)
        await asyncio.wait_for(pool.stop(drain=True), 10)

    asyncio.run(main())
    assert track.handled == Counter(range(300))
    assert track.peak == 4
    assert len(track.workers) == 4


def test_thread_pool_each_job_once_and_bounded(RingQueue, pool_cls):
    track = Tracker()

    def handler(job):
        track.enter(job, threading.current_thread().name)
        time.sleep(0.0005)
        track.leave()

    q = RingQueue(16)
    pool = pool_cls(3, handler, q)
    assert not pool.is_async
    pool.start()
    for job in range(200):
        q.put(job, timeout=10)
    pool.stop(drain=True)
    assert track.handled == Counter(range(200))
    assert track.peak <= 3
    assert pool.handled == 200 and pool.failed == 0


def test_stop_drain_handles_everything_queued(RingQueue, pool_cls):
    done = []

    async def handler(job):
        await asyncio.sleep(0)
        done.append(job)

    async def main():
        q = RingQueue(1000)
        q.put_many(range(500))  # queued before the pool even starts
        pool = pool_cls(8, handler, q)
        pool.start()
        await asyncio.wait_for(pool.stop(), 10)
        assert q.closed and q.qsize() == 0
        assert pool.busy == 0

    asyncio.run(main())
    assert sorted(done) == list(range(500))


def test_stop_without_drain_hands_back_queued_jobs(RingQueue, pool_cls):
    started = []
    release = None

    async def handler(job):
        started.append(job)
        await release.wait()

    async def main():
        nonlocal release
        release = asyncio.Event()
        q = RingQueue(100)
        q.put_many(range(10))
        pool = pool_cls(2, handler, q)
        pool.start()
        while len(started) < 2:
            await asyncio.sleep(0.001)
        stopping = asyncio.ensure_future(pool.stop(drain=False))
        await asyncio.sleep(0.01)
        release.set()
        await asyncio.wait_for(stopping, 10)
        left = q.get_many(100)
        # Each job is either handled or still in the queue, never both, never lost.
        assert sorted(started + left) == list(range(10))
        assert not q.closed

    asyncio.run(main())


def test_stop_without_drain_on_an_idle_pool(RingQueue, pool_cls):
    async def handler(job):
        pass

    async def main():
        q = RingQueue(4)
        pool = pool_cls(2, handler, q)
        pool.start()
        await asyncio.sleep(0.01)  # dispatcher now waits on the empty queue
        await asyncio.wait_for(pool.stop(drain=False), 5)
        q.put_nowait("still usable")

    asyncio.run(main())


@pytest.mark.parametrize("mode", ["async", "thread"])
def test_failing_handler_loses_nothing(RingQueue, pool_cls, mode, caplog):
    handled, failed = [], []

    def work(job):
        if job % 5 == 0:
            raise RuntimeError(f"boom {job}")
        handled.append(job)

    async def ahandler(job):
        work(job)

    def on_error(job, exc):
        failed.append((job, str(exc)))

    q = RingQueue(100)
    q.put_many(range(50))
    with caplog.at_level(logging.ERROR, logger="fastingest.pool"):
        if mode == "async":

            async def main():
                pool = pool_cls(3, ahandler, q, on_error=on_error)
                pool.start()
                await asyncio.wait_for(pool.stop(), 10)
                return pool

            pool = asyncio.run(main())
        else:
            pool = pool_cls(3, work, q, on_error=on_error)
            pool.start()
            pool.stop()
    assert sorted(handled) == [j for j in range(50) if j % 5]
    assert sorted(j for j, _ in failed) == list(range(0, 50, 5))
    assert pool.failed == 10 and pool.handled == 40
    assert sum("handler failed" in r.message for r in caplog.records) == 10


def test_pool_argument_and_state_errors(RingQueue, pool_cls):
    with pytest.raises(ValueError):
        pool_cls(0, print, RingQueue(1))
    pool = pool_cls(1, print, RingQueue(1))
    with pytest.raises(RuntimeError):
        pool.stop()
    pool.start()
    with pytest.raises(RuntimeError):
        pool.start()
    pool.stop()
