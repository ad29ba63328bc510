"""What the landed tree costs to store and to query: NDJSON (zstd) against Parquet.

    python -m bench.landing_bench                      # 1,000,000 payloads
    python -m bench.landing_bench --payloads 200000 --reps 5

Builds the same payloads (shaped like ../shared/anchors/wrk/post.lua's: nested
user, device and props, a 6-valued "type", epoch-ms "ts") into two trees, batch by
batch as the service does: a batch closes at the service's --batch-max-bytes or
--batch-max-payloads (4 MiB or 50,000 by default) and becomes one object,
sealed by the service's own code (``Upload.seal``: the zstd NDJSON encoder, or the
Parquet writer with inferred schema), under ``dt=/hour=`` keys. Then reports, for
each format, bytes stored per payload, the seal CPU per payload, and DuckDB's time
for a count and for a group-by over the whole tree, run alternately (ABAB) --reps
times each; the ratios are NDJSON's time over Parquet's. Each batch is also converted
to Parquet with pyarrow's JSON reader in place of the compiled one (``columns``), and
read alone by each, in turns (the objects must be the same bytes).
"""

from __future__ import annotations

import argparse
import random
import statistics
import string
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import duckdb
import orjson

from bench import parse_args, write_results
from fastingest import columns, parquet
from fastingest.batching import KeyMaker, Upload, extension
from fastingest.config import Settings
from fastingest.parquet import ParquetWriter
from fastingest.split import shape

TYPES = ["page_view", "click", "purchase", "signup", "scroll", "error"]
OSES = ["linux", "ios", "android", "windows", "macos"]
QUERIES = {
    "count": "SELECT count(*) FROM {src}",
    "group_by": (
        "SELECT type, count(*), avg(props.duration_ms), max(user.id) FROM {src} "
        "GROUP BY type ORDER BY type"
    ),
}


def payloads(n: int, seed: int = 42) -> list[bytes]:
    rng = random.Random(seed)
    letters = string.ascii_letters + string.digits

    def word(k: int) -> str:
        return "".join(rng.choices(letters, k=k))

    start = 1765000000000  # an hour's worth of events per 100,000 payloads
    return [
        orjson.dumps(
            {
                "id": f"{rng.getrandbits(128):032x}",
                "seq": i,
                "ts": start + i * 36,
                "type": rng.choice(TYPES),
                "user": {"id": rng.randint(1, 9_999_999), "name": word(10), "tags": [word(5)]},
                "device": {"os": rng.choice(OSES), "ip": f"192.0.2.{rng.randint(1, 254)}"},
                "props": {
                    "url": f"https://example.com/{word(8)}",
                    "duration_ms": rng.randint(1, 60000),
                    "score": rng.random(),
                    "ok": rng.random() > 0.5,
                },
                "note": word(rng.randint(40, 160)),
            }
        )
        + b"\n"
        for i in range(n)
    ]


def batches(lines: list[bytes], max_bytes: int, max_payloads: int) -> list[range]:
    """Where the service closes batches: at `max_bytes` or `max_payloads`, whichever first."""
    out, first, size = [], 0, 0
    for i, line in enumerate(lines):
        size += len(line)
        if size >= max_bytes or i + 1 - first >= max_payloads:
            out.append(range(first, i + 1))
            first, size = i + 1, 0
    if first < len(lines):
        out.append(range(first, len(lines)))
    return out


def build(root: Path, lines: list[bytes], spans: list[range], fmt: str) -> dict[str, float]:
    """Seal `lines` into objects under `root` as the service does; bytes and seal CPU."""
    keys = KeyMaker("", "bench", 1, host="h")
    writer = ParquetWriter("zstd") if fmt == "parquet" else None
    stored = 0
    cpu = 0.0
    for span in spans:
        part = lines[span.start : span.stop]
        opened = orjson.loads(part[0])["ts"] / 1000
        key = keys.batch(opened, span.start, span.stop - 1, extension(fmt, "zstd"))
        upload = Upload.batch(
            key,
            span,
            "zstd",
            opened=opened,
            last=opened,
            raw_size=sum(map(len, part)),
            payloads=len(part),
            parts=part,
            writer=writer,
            keys=keys,
        )
        started = time.process_time()
        upload.seal()
        cpu += time.process_time() - started
        assert upload.rejected == 0, upload.rejects
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(upload.body)
        stored += len(upload.body)
    return {"bytes_per_payload": stored / len(lines), "seal_us_per_payload": cpu / len(lines) * 1e6}


def readers(lines: list[bytes], spans: list[range]) -> dict[str, float]:
    """CPU per payload of converting each batch to Parquet with the compiled reader and
    with pyarrow's JSON reader in its place (the same bytes either way), and of reading
    it alone with each (pyarrow's with the ``split.shape`` scan it needs beside it);
    batch by batch, in turns, so that neither meets a warmer process."""
    bounds = (parquet.MAX_FIELDS, parquet.CELLS_PER_VALUE, parquet.FREE_CELLS)
    writer = ParquetWriter("zstd")

    def by_pyarrow(data: bytes) -> bytes:
        with mock.patch.object(parquet, "read_table", lambda *_: None):
            return writer.convert(data)[0]

    ways: dict[str, Callable[[bytes], object]] = {
        "convert_us": lambda data: writer.convert(data)[0],
        "convert_by_pyarrow_us": by_pyarrow,
        "compiled_read_us": lambda data: columns.read_table(data, *bounds),
        "pyarrow_read_us": lambda data: parquet._read_json(data, None),
        "shape_us": lambda data: shape(data, parquet.MAX_FIELDS),
    }
    cpu = dict.fromkeys(ways, 0.0)
    for k, span in enumerate(spans):
        data = b"".join(lines[span.start : span.stop])
        bodies = set()
        for name in list(ways)[:: 1 if k % 2 else -1]:
            started = time.process_time()
            found = ways[name](data)
            cpu[name] += time.process_time() - started
            assert found is not None
            if name.startswith("convert"):
                bodies.add(found)
        assert len(bodies) == 1, "the two readers made different objects"
    return {k: v / len(lines) * 1e6 for k, v in cpu.items()}


def source(root: Path, fmt: str) -> str:
    if fmt == "parquet":
        return f"read_parquet('{root}/**/*.parquet', hive_partitioning = true)"
    return (
        f"read_json('{root}/**/*.ndjson.zst', format = 'newline_delimited', "
        "hive_partitioning = true)"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--payloads", type=int, default=1_000_000)
    defaults = Settings()
    ap.add_argument(
        "--batch-max-bytes", type=int, default=defaults.batch_max_bytes, help="as the service's"
    )
    ap.add_argument(
        "--batch-max-payloads",
        type=int,
        default=defaults.batch_max_payloads,
        help="as the service's",
    )
    args = parse_args(ap, argv, reps=3)
    lines = payloads(args.payloads)
    spans = batches(lines, args.batch_max_bytes, args.batch_max_payloads)
    formats = ("ndjson", "parquet")
    stats: dict[str, dict[str, Any]] = {}
    answers: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="fi-landing-") as tmp:
        for fmt in formats:
            stats[fmt] = build(Path(tmp) / fmt, lines, spans, fmt)
            stats[fmt]["seconds"] = {q: [] for q in QUERIES}
        con = duckdb.connect()
        for rep in range(args.reps):
            order = formats if rep % 2 == 0 else formats[::-1]
            for fmt in order:
                for name, sql in QUERIES.items():
                    started = time.perf_counter()
                    rows = con.sql(sql.format(src=source(Path(tmp) / fmt, fmt))).fetchall()
                    stats[fmt]["seconds"][name].append(time.perf_counter() - started)
                    answers.setdefault(name, {})[fmt] = rows
    stats["readers"] = readers(lines, spans)
    for name, by_fmt in answers.items():  # the two trees must hold the same table
        assert by_fmt["ndjson"] == by_fmt["parquet"], (name, by_fmt)
    each = args.payloads / len(spans)
    print(f"{args.payloads:,} payloads, {each:,.0f} per object, {args.reps} reps (median)\n")
    print("| | NDJSON zstd | Parquet zstd | NDJSON / Parquet |")
    print("|---|---:|---:|---:|")
    nd, pq = stats["ndjson"], stats["parquet"]
    a, b = nd["bytes_per_payload"], pq["bytes_per_payload"]
    print(f"| bytes stored per payload | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    print(
        f"| seal CPU per payload (µs) | {nd['seal_us_per_payload']:.2f} | "
        f"{pq['seal_us_per_payload']:.2f} | "
        f"{nd['seal_us_per_payload'] / pq['seal_us_per_payload']:.2f}x |"
    )
    r = stats["readers"]
    print(
        f"| converting to Parquet per payload (µs): compiled reader / pyarrow's | | "
        f"{r['convert_us']:.2f} / {r['convert_by_pyarrow_us']:.2f} | "
        f"{r['convert_us'] / r['convert_by_pyarrow_us']:.2f}x |"
    )
    print(
        f"| of which reading (µs): compiled reader / pyarrow's + shape | | "
        f"{r['compiled_read_us']:.2f} / {r['pyarrow_read_us']:.2f} + {r['shape_us']:.2f} | |"
    )
    for name in QUERIES:
        a = statistics.median(nd["seconds"][name])
        b = statistics.median(pq["seconds"][name])
        nd[f"{name}_median_s"], pq[f"{name}_median_s"] = a, b
        print(f"| DuckDB {name} (s) | {a:.3f} | {b:.3f} | {a / b:.1f}x |")
    out = write_results(
        "landing_bench",
        args.out,
        {"args": {k: str(v) for k, v in vars(args).items()}, "queries": QUERIES},
        results=stats,
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
