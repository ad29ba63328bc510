"""Cutting a collection into payloads: the compiled splitter against the paths it replaces.

    python -m bench.split_bench [--n 1 10 100] [--bodies 500] [--reps 7] [--cpu 1]

Four ways to turn one POST body (wrk's ``post.lua`` shape: a collection of N payloads)
into the NDJSON chunk the pipeline queues, each timed per body, side by side:

- ``orjson``: parse the whole document and dump each payload again, then check member
  names with the stdlib parser (``bodies._parse_json``, what the server does with a body
  the splitter leaves to it);
- ``python``: the splitter's specification, ``_split_py.split_payloads``;
- ``compiled``: ``_split.split_payloads``, the one the server runs, checking that no
  payload repeats a member name (the default);
- ``unchecked``: the same without that check (``--duplicate-keys allow``);
- ``partitioned``: ``compiled``, then the chunk split by partition as the batcher splits
  it with ``--partition-by type`` (``Partitioner.split``: the splitter's scan groups the
  lines by the field's text, reading each line up to the field);
- ``timed``: the same with ``--time-field ts`` too, which takes each line's values.

Each (N, way) runs ``--reps`` times in a shuffled order over the same bodies; the table
shows medians, the compiled splitter's time as a multiple of the orjson path's, the
name check's cost as compiled / unchecked, and the partition splits' as partitioned /
compiled and timed / compiled. All ways must give the same chunk for every body, or the
run stops. Results go to ``bench/results/split_bench-<time>.json``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable

from bench import parse_args, write_results
from bench.front_bench import body
from fastingest import _split_py
from fastingest.bodies import _parse_json
from fastingest.partitions import Partitioner

Split = Callable[[bytes], bytes | None]


def _orjson(raw: bytes) -> bytes:
    return _parse_json(raw, True).chunk


def _chunk_of(split: Callable[[bytes], tuple[bytes, int, str | None] | None]) -> Split:
    def run(raw: bytes) -> bytes | None:
        got = split(raw)
        return None if got is None else got[0]

    return run


def _partitioned(split: Split, time_field: str | None) -> Split:
    partitioner = Partitioner(["type"], time_field, unique=True)  # as the server's default

    def run(raw: bytes) -> bytes | None:
        chunk = split(raw)
        if chunk is not None:
            partitioner.split(chunk, 0.0)
        return chunk

    return run


def per_body(split: Split, bodies: list[bytes]) -> float:
    """Seconds of this thread's CPU per body."""
    start = time.thread_time()
    for raw in bodies:
        split(raw)
    return (time.thread_time() - start) / len(bodies)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1, 10, 100], help="payloads per body")
    ap.add_argument("--bodies", type=int, default=500, help="bodies per run")
    args = parse_args(ap, argv, reps=7)
    try:
        from fastingest import _split
    except ImportError:
        sys.exit("fastingest._split is not compiled here: pip install . first")
    ways: dict[str, Split] = {
        "orjson": _orjson,
        "python": _chunk_of(_split_py.split_payloads),
        "compiled": _chunk_of(_split.split_payloads),
        "unchecked": _chunk_of(lambda raw: _split.split_payloads(raw, False)),
        "partitioned": _partitioned(_chunk_of(_split.split_payloads), None),
        "timed": _partitioned(_chunk_of(_split.split_payloads), "ts"),
    }
    bodies = {n: [body(n, seed) for seed in range(args.bodies)] for n in args.n}
    for n, some in bodies.items():
        for raw in some:
            chunks = {name: way(raw) for name, way in ways.items()}
            if len(set(chunks.values())) != 1:  # None: the splitter left the body to orjson
                got = {w: c if c is None else len(c) for w, c in chunks.items()}
                sys.exit(f"the ways disagree on a body of N={n} ({len(raw)} bytes): {got}")
    samples: dict[tuple[int, str], list[float]] = {(n, w): [] for n in args.n for w in ways}
    for rep in range(args.reps):
        order = list(samples)
        random.shuffle(order)
        for n, way in order:
            samples[(n, way)].append(per_body(ways[way], bodies[n]) * 1e6)
        print(f"repetition {rep + 1}/{args.reps} done", file=sys.stderr, flush=True)

    results = []
    print(f"\nCPU per body, µs (median of {args.reps} runs of {args.bodies} bodies)")
    print(
        "| N | body bytes | orjson | python | compiled | unchecked | partitioned | timed "
        "| compiled takes | check | partition split | with event time |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.n:
        med = {w: statistics.median(samples[(n, w)]) for w in ways}
        size = statistics.mean(len(raw) for raw in bodies[n])
        print(
            f"| {n} | {size:,.0f} | {med['orjson']:.2f} | {med['python']:.2f} | "
            f"{med['compiled']:.2f} | {med['unchecked']:.2f} | {med['partitioned']:.2f} | "
            f"{med['timed']:.2f} | {med['compiled'] / med['orjson']:.2f}x | "
            f"{med['compiled'] / med['unchecked']:.2f}x | "
            f"{med['partitioned'] / med['compiled']:.2f}x | {med['timed'] / med['compiled']:.2f}x |"
        )
        results.append(
            {
                "n": n,
                "body_bytes": size,
                **{f"{w}_us": med[w] for w in ways},
                "ratio": med["compiled"] / med["orjson"],
                "check_ratio": med["compiled"] / med["unchecked"],
                "partition_ratio": med["partitioned"] / med["compiled"],
                "timed_ratio": med["timed"] / med["compiled"],
                "runs": {w: samples[(n, w)] for w in ways},
            }
        )
    meta = {"bodies": args.bodies, "reps": args.reps}
    out = write_results("split_bench", args.out, meta, results=results)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
