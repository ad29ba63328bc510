"""The landed tree read back as analysts read it: DuckDB and pyarrow over the objects.

Every acknowledged payload is one row with the values and types it was sent with:
nested objects, unicode, 64-bit integers, nulls, arrays; the ``dt=``/``hour=`` key
segments read as Hive partitions. The file sink is read from disk, and the S3 sink
over moto's HTTP API by pyarrow's own S3 client. pyarrow.dataset's JSON format does not
decompress zstd, so pyarrow reads each object through ``open_input_stream(...,
compression="detect")``, which every compression passes, and the dataset API where it
works (gzip and none).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import duckdb
import pyarrow.dataset as ds
import pyarrow.fs
import pyarrow.json
import pytest

from support import Server, post_forms, pyarrow_s3, rich_payload

N = 300  # payloads, in requests of every body form


def payload(i: int) -> dict[str, Any]:
    return rich_payload(i)


def send(server: Server) -> int:
    return post_forms(server, [payload(i) for i in range(N)])


def utc_day() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")


def check_rows(rows: list[dict[str, Any]], acked: int, days: set[str]) -> None:
    """One row per acknowledged payload, each as sent, under the day it arrived."""
    assert len(rows) == acked == N
    assert sorted(r["id"] for r in rows) == list(range(N))
    for row in rows:
        want = payload(row["id"])
        assert {k: row[k] for k in want} == want, row
        assert str(row["dt"]) in days and 0 <= int(row["hour"]) < 24, row


def pyarrow_rows(fs: pyarrow.fs.FileSystem, root: str) -> list[dict[str, Any]]:
    """Every object under `root` read by pyarrow, with its Hive partition values."""
    rows = []
    for info in fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True)):
        if info.type != pyarrow.fs.FileType.File:
            continue
        with fs.open_input_stream(info.path, compression="detect") as stream:
            table = pyarrow.json.read_json(stream)
        hive = dict(part.split("=", 1) for part in info.path.split("/") if "=" in part)
        rows += [{**row, **hive} for row in table.to_pylist()]
    return rows


@pytest.mark.parametrize("compression", ["zstd", "gzip", "none"])
def test_duckdb_and_pyarrow_read_every_payload_from_the_file_sink(tmp_path, compression):
    args = ["--compression", compression, "--batch-max-payloads", "70"]
    server = Server(*args, cwd=tmp_path)
    days = {utc_day()}
    acked = send(server)
    assert server.stop() == 0
    days.add(utc_day())
    root = tmp_path / "fastingest-data" / "objects"
    assert len(list(root.rglob("*.ndjson*"))) >= N // 70  # several objects, one tree

    con = duckdb.connect()
    table = con.sql(
        f"SELECT * FROM read_json('{root}/**/*.ndjson*', format = 'newline_delimited', "
        "hive_partitioning = true, hive_types_autocast = false)"
    )
    types = dict(zip(table.columns, map(str, table.types), strict=True))
    assert types["big"] == "BIGINT" and types["neg"] == "BIGINT" and types["ok"] == "BOOLEAN"
    assert types["tags"] == "VARCHAR[]" and types["user"].startswith("STRUCT(id VARCHAR, geo")
    rows = [dict(zip(table.columns, r, strict=True)) for r in table.fetchall()]
    check_rows(rows, acked, days)
    counted = con.sql(
        f"SELECT ok, count(*), sum(big::HUGEINT) FROM read_json('{root}/**/*.ndjson*', "
        "format = 'newline_delimited') GROUP BY ok ORDER BY ok"
    ).fetchall()
    assert counted == [
        (False, N // 2, sum(2**63 - 1 - i for i in range(1, N, 2))),
        (True, N // 2, sum(2**63 - 1 - i for i in range(0, N, 2))),
    ]

    check_rows(pyarrow_rows(pyarrow.fs.LocalFileSystem(), str(root)), acked, days)
    if compression != "zstd":
        dataset = ds.dataset(str(root), format="json", partitioning="hive")
        check_rows(dataset.to_table().to_pylist(), acked, days)


def test_pyarrow_reads_the_bucket_over_the_s3_api(tmp_path, bucket, s3_env):
    args = ["--sink", f"s3://{bucket}/events", "--batch-max-payloads", "70"]
    server = Server(*args, cwd=tmp_path, env=s3_env)
    days = {utc_day()}
    acked = send(server)
    assert server.stop() == 0
    days.add(utc_day())
    s3 = pyarrow_s3(s3_env)
    assert len(s3.get_file_info(pyarrow.fs.FileSelector(bucket, recursive=True))) >= N // 70
    check_rows(pyarrow_rows(s3, f"{bucket}/events"), acked, days)
