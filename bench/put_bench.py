"""One S3 PUT's cost on the event loop: the sink's direct path against botocore's put_object.

    python -m bench.put_bench [--puts 20] [--mb 1.6] [--reps 3] [--cpu 1]

Starts moto_server on 127.0.0.1 and, on uvloop, stores ``--puts`` objects of
``--mb`` MB through ``S3Sink`` on each path (``direct``, the default, and
``put_object``), the paths alternating in every repetition. Two figures per run:

- event-loop CPU per PUT: this thread's CPU time over PUTs made one after another;
- the loop's steps: PUTs made again beside a probe that yields after every step,
  counting per PUT the steps over 0.3 and 0.5 ms of CPU, and the longest. A request
  in flight on a server waits out each such step.

Medians of the repetitions, with ``direct`` as a multiple of ``put_object``.
Results go to ``bench/results/put_bench-<time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from typing import Any

from bench import parse_args, write_results
from bench.http_bench import Moto
from fastingest.batching import Upload
from fastingest.sinks.s3 import S3Sink

PATHS = {"direct": True, "put_object": False}


def uploads(prefix: str, count: int, size: int) -> list[Upload]:
    """Incompressible bodies, like the compressed batches the sink stores."""
    out = []
    for i in range(count):
        upload = Upload(f"{prefix}/{i}", [os.urandom(size)], size, 1, 0.0, 0.0, "application/zstd")
        upload.seal()
        out.append(upload)
    return out


async def one_run(bucket: str, direct: bool, puts: int, size: int, tag: str) -> dict[str, Any]:
    sink = S3Sink(bucket, direct=direct)
    await sink.start()
    try:
        assert sink.direct is direct, "the direct path did not start: see the sink's log"
        await sink.put(uploads(f"{tag}/warm", 1, size)[0])  # connection and credentials
        serial = uploads(f"{tag}/cpu", puts, size)
        start = time.thread_time()
        for upload in serial:
            await sink.put(upload)
        cpu_ms = (time.thread_time() - start) * 1000 / puts

        steps: list[float] = []
        loop = asyncio.get_running_loop()
        for upload in uploads(f"{tag}/steps", puts, size):
            task = loop.create_task(sink.put(upload))
            last = time.thread_time()
            while not task.done():
                await asyncio.sleep(0)
                now = time.thread_time()
                steps.append((now - last) * 1000)
                last = now
            task.result()
        return {
            "cpu_ms_per_put": cpu_ms,
            "steps_over_0_3ms_per_put": sum(s > 0.3 for s in steps) / puts,
            "steps_over_0_5ms_per_put": sum(s > 0.5 for s in steps) / puts,
            "longest_step_ms": max(steps),
        }
    finally:
        await sink.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--puts", type=int, default=20, help="PUTs per path per repetition")
    ap.add_argument("--mb", type=float, default=1.6, help="object size (a 4 MiB batch, zstd)")
    args = parse_args(ap, argv, reps=3)
    import uvloop

    size = int(args.mb * 1_000_000)
    moto = Moto()
    os.environ.update(
        AWS_ENDPOINT_URL=moto.url,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_REGION="us-east-1",
    )
    bucket = moto.bucket("put-bench")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in PATHS}
    try:
        for rep in range(args.reps):
            order = list(PATHS) if rep % 2 == 0 else list(reversed(PATHS))
            for name in order:
                got = uvloop.run(one_run(bucket, PATHS[name], args.puts, size, f"{rep}-{name}"))
                runs[name].append(got)
                print(
                    f"repetition {rep + 1}/{args.reps}, {name}: "
                    f"{got['cpu_ms_per_put']:.2f} ms CPU per PUT",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        moto.close()

    keys = list(runs["direct"][0])
    med = {name: {k: statistics.median(r[k] for r in runs[name]) for k in keys} for name in PATHS}
    print(f"\n{args.puts} PUTs of {args.mb} MB per run, medians of {args.reps} runs; steps per PUT")
    print("| | CPU per PUT, ms | steps > 0.3 ms | steps > 0.5 ms | longest step, ms |")
    print("|---|---:|---:|---:|---:|")
    for name in PATHS:
        m = med[name]
        print(
            f"| {name} | {m['cpu_ms_per_put']:.2f} | {m['steps_over_0_3ms_per_put']:.2f} | "
            f"{m['steps_over_0_5ms_per_put']:.2f} | {m['longest_step_ms']:.2f} |"
        )
    ratio = med["direct"]["cpu_ms_per_put"] / med["put_object"]["cpu_ms_per_put"]
    print(f"\ndirect takes {ratio:.2f}x put_object's CPU per PUT")
    meta = {"puts": args.puts, "mb": args.mb, "reps": args.reps}
    out = write_results("put_bench", args.out, meta, medians=med, ratio=ratio, runs=runs)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
