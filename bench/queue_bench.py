"""Queue core benchmark: RingQueue against the standard library's queues, side by side.

    python -m bench.queue_bench [--pairs 1000000] [--reps 5] [--cpu 1]

Every case runs --reps times in one process (GC off, order shuffled per
repetition) and reports the median. Ratios compare RingQueue with each baseline
measured in the same run. Results go to bench/results/queue_bench-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import queue
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable

from bench import parse_args, write_results
from fastingest import _queue_py

try:
    from fastingest._queue import RingQueue
except ImportError:  # pragma: no cover
    sys.exit("fastingest._queue is not built: pip install . first")

BATCH = 64
MAXSIZE = 10_000


# Each case returns the seconds it took to move `n` items through the queue.


def single_thread(put: Callable, get: Callable) -> Callable[[int], float]:
    def run(n: int) -> float:
        t = time.perf_counter()
        for i in range(n):
            put(i)
            get()
        return time.perf_counter() - t

    return run


def tasks(make: Callable, put_name: str, get_name: str) -> Callable[[int], float]:
    def run(n: int) -> float:
        async def main() -> float:
            q = make()
            put, get = getattr(q, put_name), getattr(q, get_name)

            async def producer() -> None:
                for i in range(n):
                    await put(i)

            async def consumer() -> None:
                for _ in range(n):
                    await get()

            t = time.perf_counter()
            await asyncio.gather(producer(), consumer())
            return time.perf_counter() - t

        return asyncio.run(main())

    return run


def threads(make: Callable) -> Callable[[int], float]:
    def run(n: int) -> float:
        q = make()

        def producer() -> None:
            put = q.put
            for i in range(n):
                put(i)

        get = q.get
        th = threading.Thread(target=producer)
        t = time.perf_counter()
        th.start()
        for _ in range(n):
            get()
        th.join()
        return time.perf_counter() - t

    return run


def batched_ring(make: Callable) -> Callable[[int], float]:
    def run(n: int) -> float:
        q, batch = make(), list(range(BATCH))
        t = time.perf_counter()
        for _ in range(n // BATCH):
            q.put_many(batch)
            q.get_many(BATCH)
        return time.perf_counter() - t

    return run


def batched_deque(n: int) -> float:
    d: collections.deque[int] = collections.deque()
    batch = list(range(BATCH))
    t = time.perf_counter()
    for _ in range(n // BATCH):
        d.extend(batch)
        [d.popleft() for _ in range(BATCH)]
    return time.perf_counter() - t


def batched_items(make: Callable) -> Callable[[int], float]:
    def run(n: int) -> float:
        q, batch = make(), list(range(BATCH))
        t = time.perf_counter()
        for _ in range(n // BATCH):
            for item in batch:
                q.put(item)
            [q.get() for _ in range(BATCH)]
        return time.perf_counter() - t

    return run


def cases() -> dict[str, dict[str, Callable[[int], float]]]:
    ring: RingQueue[int] = RingQueue(MAXSIZE)
    twin: _queue_py.RingQueue[int] = _queue_py.RingQueue(MAXSIZE)
    dq: collections.deque[int] = collections.deque()
    sq: queue.SimpleQueue[int] = queue.SimpleQueue()
    qq: queue.Queue[int] = queue.Queue(MAXSIZE)
    aq: asyncio.Queue[int] = asyncio.Queue(MAXSIZE)
    return {
        "a. single thread put/get pairs": {
            "RingQueue": single_thread(ring.put_nowait, ring.get_nowait),
            "RingQueue (python twin)": single_thread(twin.put_nowait, twin.get_nowait),
            "queue.SimpleQueue": single_thread(sq.put, sq.get),
            "queue.Queue": single_thread(qq.put_nowait, qq.get_nowait),
            "asyncio.Queue nowait": single_thread(aq.put_nowait, aq.get_nowait),
            "collections.deque": single_thread(dq.append, dq.popleft),
        },
        "b. asyncio producer task -> consumer task": {
            "RingQueue": tasks(lambda: RingQueue(MAXSIZE), "aput", "aget"),
            "RingQueue (python twin)": tasks(lambda: _queue_py.RingQueue(MAXSIZE), "aput", "aget"),
            "asyncio.Queue": tasks(lambda: asyncio.Queue(MAXSIZE), "put", "get"),
        },
        "c. 1 producer thread -> 1 consumer thread": {
            "RingQueue": threads(lambda: RingQueue(MAXSIZE)),
            "RingQueue (python twin)": threads(lambda: _queue_py.RingQueue(MAXSIZE)),
            "queue.Queue": threads(lambda: queue.Queue(MAXSIZE)),
            "queue.SimpleQueue": threads(queue.SimpleQueue),
        },
        f"d. batches of {BATCH}: put_many/get_many": {
            "RingQueue": batched_ring(lambda: RingQueue(MAXSIZE)),
            "RingQueue (python twin)": batched_ring(lambda: _queue_py.RingQueue(MAXSIZE)),
            "collections.deque extend/popleft": batched_deque,
            "queue.Queue item by item": batched_items(lambda: queue.Queue(MAXSIZE)),
            "queue.SimpleQueue item by item": batched_items(queue.SimpleQueue),
        },
    }


# The core's targets: (case prefix, baseline, minimum RingQueue/baseline ratio).
TARGETS = [
    ("a.", "queue.SimpleQueue", 0.75),
    ("b.", "asyncio.Queue", 3.0),
    ("c.", "queue.Queue", 5.0),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pairs", type=int, default=1_000_000, help="items per repetition")
    args = parse_args(ap, argv, reps=5)

    table = cases()
    samples: dict[str, dict[str, list[float]]] = {
        c: {i: [] for i in impls} for c, impls in table.items()
    }
    gc.disable()
    for rep in range(args.reps):
        order = [(c, i) for c, impls in table.items() for i in impls]
        random.shuffle(order)
        for case, impl in order:
            seconds = table[case][impl](args.pairs)
            samples[case][impl].append(args.pairs / seconds)
        print(f"repetition {rep + 1}/{args.reps} done", file=sys.stderr, flush=True)
    gc.enable()

    results = []
    for case, impls in samples.items():
        medians = {impl: statistics.median(v) for impl, v in impls.items()}
        ring = medians["RingQueue"]
        print(f"\n{case}  (median of {args.reps}, {args.pairs:,} items)")
        print(f"| {'implementation':<34} | {'items/s':>13} | {'RingQueue is':>12} |")
        print(f"|{'-' * 36}|{'-' * 15}:|{'-' * 14}:|")
        for impl, ops in sorted(medians.items(), key=lambda kv: -kv[1]):
            ratio = "" if impl == "RingQueue" else f"{ring / ops:.2f}x"
            print(f"| {impl:<34} | {ops:>13,.0f} | {ratio:>12} |")
            results.append({"case": case, "impl": impl, "median_ops": ops, "runs": impls[impl]})

    print("\ntargets (RingQueue / baseline, same run):")
    verdicts = []
    for prefix, baseline, want in TARGETS:
        case = next(c for c in samples if c.startswith(prefix))
        got = statistics.median(samples[case]["RingQueue"]) / statistics.median(
            samples[case][baseline]
        )
        ok = got >= want
        verdicts.append(
            {"case": case, "baseline": baseline, "ratio": got, "target": want, "met": ok}
        )
        print(f"  {case}: {got:.2f}x {baseline} (target >= {want}x) {'met' if ok else 'MISSED'}")

    meta = {"pairs": args.pairs, "reps": args.reps}
    out = write_results("queue_bench", args.out, meta, results=results, targets=verdicts)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
