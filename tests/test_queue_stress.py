"""Many producers and consumers (threads, asyncio tasks, both): every item once, in order.

Each item is (producer, seq). A FIFO queue hands one producer's items out in seq
order, so every consumer must see each producer's seqs strictly increasing, and
all consumers together must see every item exactly once.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from fastingest import QueueClosed

PRODUCERS = CONSUMERS = 4
TOTAL = 1_000_000
PER_PRODUCER = TOTAL // PRODUCERS

pytestmark = pytest.mark.timeout(240)


def check(received: list[list[tuple[int, int]]]) -> None:
    count = 0
    for seen in received:
        last = [-1] * PRODUCERS
        for producer, seq in seen:
            assert seq > last[producer], "per-producer order broken"
            last[producer] = seq
        count += len(seen)
    assert count == TOTAL
    everything = {item for seen in received for item in seen}
    assert len(everything) == TOTAL, "an item arrived twice"


def thread_producer(q, p: int) -> None:
    for seq in range(PER_PRODUCER):
        q.put((p, seq))


def thread_consumer(q, out: list) -> None:
    append = out.append
    try:
        while True:
            append(q.get())
    except QueueClosed:
        pass


async def task_producer(q, p: int) -> None:
    for seq in range(PER_PRODUCER):
        await q.aput((p, seq))


async def task_consumer(q, out: list) -> None:
    append = out.append
    try:
        while True:
            append(await q.aget())
    except QueueClosed:
        pass


def join_all(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.join(200)
        assert not t.is_alive(), f"{t.name} is stuck"


@pytest.mark.slow
def test_threads_to_threads(RingQueue):
    q = RingQueue(1024)
    received = [[] for _ in range(CONSUMERS)]
    consumers = [threading.Thread(target=thread_consumer, args=(q, out)) for out in received]
    producers = [threading.Thread(target=thread_producer, args=(q, p)) for p in range(PRODUCERS)]
    for t in consumers + producers:
        t.start()
    join_all(producers)
    q.close()
    join_all(consumers)
    check(received)


@pytest.mark.slow
def test_tasks_to_threads(RingQueue):
    q = RingQueue(1024)
    received = [[] for _ in range(CONSUMERS)]
    consumers = [threading.Thread(target=thread_consumer, args=(q, out)) for out in received]
    for t in consumers:
        t.start()

    async def produce():
        await asyncio.gather(*(task_producer(q, p) for p in range(PRODUCERS)))

    asyncio.run(produce())
    q.close()
    join_all(consumers)
    check(received)


@pytest.mark.slow
def test_threads_to_tasks(RingQueue):
    q = RingQueue(1024)
    received = [[] for _ in range(CONSUMERS)]
    producers = [threading.Thread(target=thread_producer, args=(q, p)) for p in range(PRODUCERS)]

    async def consume():
        tasks = [asyncio.ensure_future(task_consumer(q, out)) for out in received]
        for t in producers:
            t.start()
        await asyncio.get_running_loop().run_in_executor(None, join_all, producers)
        q.close()
        await asyncio.gather(*tasks)

    asyncio.run(consume())
    check(received)
