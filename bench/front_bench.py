"""The lean front end in-process: compiled ``_lean`` against its Python source, side by side.

    python -m bench.front_bench [--n 1 10] [--rounds 1500] [--reps 7] [--cpu 1]

No sockets and no load generator: 64 connections on a fake transport each get one
request per round (wrk's ``post.lua`` shape: a collection of N payloads), then the
event loop turns once, as under wrk's 64 connections. What is timed is the event-loop
thread's CPU per request, so the host's steal and the kernel's socket work stay out of
it. Two cases:

- ``front``: the HTTP work alone (parse, route, answer; ``/ingest`` answers at once);
- ``ingest``: the whole path, through the splitter, the spool, the intake queue and the
  batcher to a local-directory sink, with ``--ack received``.

Each (case, N, build) runs ``--reps`` times in a shuffled order; the table shows
medians and how much less time the compiled build takes. Every answer must be a 202,
or the run stops. Results go to ``bench/results/front_bench-<time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson

from bench import parse_args, write_results
from fastingest import lean
from fastingest.config import Settings
from fastingest.endpoints import Endpoints, _accepted
from fastingest.pipeline import Pipeline
from fastingest.sinks import open_sink

CONNECTIONS = 64


def body(n: int, seed: int) -> bytes:
    """A collection like ``post.lua``'s: N payloads of 330-460 bytes."""
    rnd = random.Random(seed)
    text = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

    def word(k: int) -> str:
        return "".join(rnd.choice(text) for _ in range(k))

    data = [
        {
            "id": f"{rnd.getrandbits(128):032x}",
            "seq": i,
            "ts": 1712000000000 + rnd.randrange(10**8),
            "type": rnd.choice(["page_view", "click", "purchase", "signup"]),
            "user": {"id": rnd.randrange(10**7), "name": word(10), "tags": [word(5), word(6)]},
            "device": {"os": "linux", "ua": f"Mozilla/5.0 ({word(12)}) {word(20)}"},
            "props": {"url": f"https://example.com/{word(8)}", "score": round(rnd.random(), 4)},
            "note": word(rnd.randrange(40, 160)),
        }
        for i in range(n)
    ]
    return orjson.dumps({"version": "1.0", "token": word(32), "data": data})


def request(payload: bytes) -> bytes:
    head = (
        "POST /ingest HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


class Transport:
    """Keeps what is written; the 202s are counted after the clock stops."""

    def __init__(self) -> None:
        self.written: list[bytes] = []  # mostly the same cached answer: a reference each

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def answers(self) -> list[bytes]:
        return [a for data in self.written for a in data.split(b"HTTP/1.1 ")[1:]]

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


async def run(impl: ModuleType, case: str, n: int, rounds: int) -> float:
    """Event-loop CPU seconds per request over `rounds` rounds of 64 requests."""
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), ack="received")
        sink = open_sink(settings.sink_url, max_connections=settings.max_workers)
        await sink.start()
        pipeline = Pipeline(settings, sink)
        await pipeline.start()
        endpoints = Endpoints(settings, pipeline, asyncio.Event())
        if case == "front":
            answer = _accepted(n, "received")
            endpoints.ingest = lambda headers, body, ack: answer  # type: ignore[method-assign]
        front = impl.LeanFront(endpoints, keepalive_timeout=60, request_timeout=60, grace=1)
        front._stamp()
        transports = [Transport() for _ in range(CONNECTIONS)]
        conns: list[Any] = []
        for t in transports:
            conn = impl.Connection(front)
            conn.connection_made(t)
            conns.append(conn)
        wire = [request(body(n, seed)) for seed in range(32)]
        for i in range(rounds // 10):  # warm-up
            for conn in conns:
                conn.data_received(wire[i % 32])
            await asyncio.sleep(0)
        cpu = time.thread_time()
        for i in range(rounds):
            raw = wire[i % 32]
            for conn in conns:
                conn.data_received(raw)
            await asyncio.sleep(0)
        cpu = time.thread_time() - cpu
        for _ in range(3):
            await asyncio.sleep(0)  # the last round's answers
        await pipeline.stop(30)
        await sink.close()
    want = CONNECTIONS * (rounds + rounds // 10)
    answers = [a for t in transports for a in t.answers()]
    got = sum(a.startswith(b"202 ") for a in answers)
    others = [a[:200] for a in answers if not a.startswith(b"202 ")]
    if got != want or others:
        sys.exit(f"{impl.__name__} {case} N={n}: {got} of {want} answers were 202: {others[:3]}")
    return cpu / (CONNECTIONS * rounds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1, 10], help="payloads per request")
    ap.add_argument("--rounds", type=int, default=1500, help="rounds of 64 requests per run")
    args = parse_args(ap, argv, reps=7)
    if not lean.COMPILED:
        sys.exit("fastingest._lean is not compiled here: pip install . first")
    builds = {"compiled": lean.impl, "python": lean._source()}
    cases = [(case, n) for case in ("front", "ingest") for n in args.n]
    samples: dict[tuple[str, int, str], list[float]] = {
        (c, n, b): [] for c, n in cases for b in builds
    }
    gc.collect()
    gc.freeze()  # as the server does once listening
    loop = asyncio.new_event_loop()
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        pass
    for rep in range(args.reps):
        order = list(samples)
        random.shuffle(order)
        for case, n, build in order:
            per = loop.run_until_complete(run(builds[build], case, n, args.rounds))
            samples[(case, n, build)].append(per * 1e6)
        print(f"repetition {rep + 1}/{args.reps} done", file=sys.stderr, flush=True)
    loop.close()

    results = []
    print(f"\nevent-loop CPU per request, µs (median of {args.reps} runs of {args.rounds} x 64)")
    print("| case | N | python | compiled | compiled takes |")
    print("|---|---:|---:|---:|---:|")
    for case, n in cases:
        py = statistics.median(samples[(case, n, "python")])
        c = statistics.median(samples[(case, n, "compiled")])
        print(f"| {case} | {n} | {py:.2f} | {c:.2f} | {c / py:.2f}x |")
        results.append(
            {
                "case": case,
                "n": n,
                "python_us": py,
                "compiled_us": c,
                "ratio": c / py,
                "runs": {b: samples[(case, n, b)] for b in builds},
            }
        )
    meta = {"rounds": args.rounds, "reps": args.reps, "connections": CONNECTIONS}
    out = write_results("front_bench", args.out, meta, results=results)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
