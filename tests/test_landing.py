"""Analytics-ready landing, read back as analysts read it.

Parquet objects and Hive partitions by payload fields and event time, through the
file sink and through S3 (moto, over HTTP), read by DuckDB and pyarrow: one row per
acknowledged payload, with its values, types and partition. What does not fit the
Parquet schema lands under ``format-conversion-failed/`` with its reason, and a
kill -9 under load replays each Parquet object once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import random
from collections import Counter
from typing import Any

import duckdb
import orjson
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs
import pyarrow.parquet as pq
import pytest

from support import (
    Server,
    crash_rounds,
    post_forms,
    pyarrow_s3,
    request,
    rich_payload,
    unpack,
    wait_until,
)

N = 240
COUNTRIES = ["DE", "a/b é=?%", None, "日本"]
EVENT_TIMES = ["2026-12-05T08:15:00Z", "2026-12-05T09:00:00Z", "2026-12-05T23:59:59Z"]
PARTITIONING = ["--partition-by", "country", "--time-field", "at", "--batch-max-payloads", "50"]


def event(i: int) -> dict[str, Any]:
    p = {**rich_payload(i), "country": COUNTRIES[i % 4]}
    if i % 10 != 9:  # every tenth has no event time: it lands under its arrival hour
        p["at"] = EVENT_TIMES[i % 3]
    return p


def utc_days() -> set[str]:
    return {dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")}


def check_rows(rows: list[dict[str, Any]], acked: int, arrival_days: set[str]) -> None:
    """One row per acknowledged payload, as sent, under its country and event hour."""
    assert len(rows) == acked == N
    assert sorted(r["id"] for r in rows) == list(range(N))
    for row in rows:
        want = event(row["id"])
        at = want.pop("at", None)
        assert {k: row[k] for k in want} == want, row
        if at is None:
            assert str(row["dt"]) in arrival_days, row
        else:
            assert (str(row["dt"]), int(row["hour"])) == (at[:10], int(at[11:13])), row


def unified(fs: pyarrow.fs.FileSystem, files: list[str]) -> pa.Schema:
    """The union of the files' schemas, as a reader of inferred batches takes it."""
    schemas = [pq.read_schema(f, filesystem=fs) for f in files]
    return pa.unify_schemas(schemas, promote_options="permissive")


def parquet_files(fs: pyarrow.fs.FileSystem, root: str) -> list[str]:
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
    return sorted(i.path for i in infos if i.path.endswith(".parquet"))


def dataset_rows(fs: pyarrow.fs.FileSystem, root: str) -> list[dict[str, Any]]:
    """Every row pyarrow.dataset reads under `root`, with its Hive partition values."""
    files = parquet_files(fs, root)
    hive = pa.schema([("country", pa.string()), ("dt", pa.string()), ("hour", pa.int32())])
    schema = unified(fs, files)
    for field in hive:
        if field.name not in schema.names:
            schema = schema.append(field)
    dataset = ds.dataset(
        files,
        filesystem=fs,
        format="parquet",
        schema=schema,
        partitioning=ds.partitioning(hive, flavor="hive"),
        partition_base_dir=root,
    )
    return dataset.to_table().to_pylist()


@pytest.mark.parametrize("fmt", ["parquet", "ndjson"])
def test_partitioned_objects_read_back_by_duckdb_and_pyarrow(tmp_path, fmt):
    server = Server("--format", fmt, *PARTITIONING, cwd=tmp_path)
    days = utc_days()
    acked = post_forms(server, [event(i) for i in range(N)])
    metrics = request(server.port, "GET", "/metrics")[2].decode()
    assert server.stop() == 0
    days |= utc_days()
    assert "fastingest_event_time_fallbacks_total 24.0" in metrics  # every tenth of 240
    root = tmp_path / "fastingest-data" / "objects"
    assert sorted(p.name for p in root.iterdir()) == [
        "country=%E6%97%A5%E6%9C%AC",
        "country=DE",
        "country=__HIVE_DEFAULT_PARTITION__",
        "country=a%2Fb%20%C3%A9%3D%3F%25",
    ]
    con = duckdb.connect()
    if fmt == "parquet":
        files = list(root.rglob("*.parquet"))
        assert all(f.read_bytes()[:4] == b"PAR1" for f in files)
        relation = con.sql(
            f"SELECT * FROM read_parquet('{root}/**/*.parquet', hive_partitioning = true, "
            "union_by_name = true, hive_types_autocast = false)"
        )
    else:
        relation = con.sql(
            f"SELECT * FROM read_json('{root}/**/*.ndjson.zst', format = 'newline_delimited', "
            "hive_partitioning = true, hive_types_autocast = false, union_by_name = true)"
        )
    types = dict(zip(relation.columns, map(str, relation.types), strict=True))
    assert types["big"] == "BIGINT" and types["ok"] == "BOOLEAN" and types["tags"] == "VARCHAR[]"
    assert types["user"].startswith("STRUCT(id VARCHAR, geo")
    rows = [dict(zip(relation.columns, r, strict=True)) for r in relation.fetchall()]
    check_rows(rows, acked, days)
    by_country = con.sql(
        f"SELECT country, count(*) FROM read_{'parquet' if fmt == 'parquet' else 'json'}("
        f"'{root}/**/*.{'parquet' if fmt == 'parquet' else 'ndjson.zst'}', "
        "hive_partitioning = true, union_by_name = true) GROUP BY country ORDER BY country"
    ).fetchall()
    assert sorted(by_country, key=str) == sorted(
        Counter(COUNTRIES[i % 4] for i in range(N)).items(), key=str
    )
    if fmt == "parquet":
        check_rows(dataset_rows(pyarrow.fs.LocalFileSystem(), str(root)), acked, days)


def test_parquet_over_the_s3_api_read_by_pyarrow_and_duckdb(tmp_path, s3, bucket, s3_env):
    args = ["--sink", f"s3://{bucket}/events", "--format", "parquet", *PARTITIONING]
    server = Server(*args, cwd=tmp_path, env=s3_env)
    days = utc_days()
    acked = post_forms(server, [event(i) for i in range(N)])
    assert server.stop() == 0
    days |= utc_days()
    s3fs = pyarrow_s3(s3_env)
    rows = dataset_rows(s3fs, f"{bucket}/events")
    check_rows(rows, acked, days)
    for entry in s3.list_objects_v2(Bucket=bucket)["Contents"]:  # each with its metadata
        got = s3.get_object(Bucket=bucket, Key=entry["Key"])
        body = got["Body"].read()
        assert got["ContentType"] == "application/vnd.apache.parquet"
        meta = got["Metadata"]
        assert meta["fastingest-sha256"] == hashlib.sha256(body).hexdigest()
        rows_in = pq.ParquetFile(io.BytesIO(body)).metadata.num_rows
        assert int(meta["fastingest-payloads"]) == rows_in
    landed = pa.Table.from_pylist(rows)  # DuckDB queries the Arrow data pyarrow read from S3
    counted = (
        duckdb.connect()
        .from_arrow(landed)
        .aggregate("ok, count(*), sum(big::HUGEINT)", "ok")
        .order("ok")
        .fetchall()
    )
    assert counted == [
        (False, N // 2, sum(2**63 - 1 - i for i in range(1, N, 2))),
        (True, N // 2, sum(2**63 - 1 - i for i in range(0, N, 2))),
    ]


def test_payloads_that_do_not_fit_the_schema_land_under_the_error_prefix(tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(
        json.dumps(
            {
                "fields": [
                    {"name": "id", "type": "int64", "nullable": False},
                    {"name": "at", "type": "timestamp"},
                    {"name": "score", "type": "float32"},
                    {"name": "tags", "type": {"list": "string"}},
                ]
            }
        )
    )
    sent = []
    for i in range(200):
        kind = i % 5
        if kind == 0:
            sent.append({"id": f"x{i}"})  # a string where the schema has int64
        elif kind == 1:
            sent.append({"id": i, "unknown": True})  # a field the schema lacks
        else:
            sent.append({"id": i, "at": "2026-12-05T08:15:00.123456Z", "score": 0.5, "tags": []})
    server = Server("--format", "parquet", "--schema", str(schema), cwd=tmp_path)
    assert send_plain(server, sent) == 200
    assert server.stop() == 0
    root = tmp_path / "fastingest-data" / "objects"
    table = pa.concat_tables(pq.read_table(f) for f in root.rglob("*.parquet"))
    assert table.schema.field("at").type == pa.timestamp("us", tz="UTC")
    duck = duckdb.sql(
        f'SELECT count(*), min("at"), typeof(min("at")) '
        f"FROM read_parquet('{root}/dt=*/**/*.parquet')"
    ).fetchall()[0]
    assert duck[0] == 120 and duck[2] == "TIMESTAMP WITH TIME ZONE"
    assert duck[1] == dt.datetime(2026, 12, 5, 8, 15, 0, 123456, tzinfo=dt.UTC)
    assert sorted(table.column("id").to_pylist()) == [i for i in range(200) if i % 5 > 1]
    rejected = [
        json.loads(line)
        for f in (root / "format-conversion-failed").rglob("*.ndjson.zst")
        for line in unpack(f.read_bytes()).splitlines()
    ]
    assert sorted(r["payload"]["id"] for r in rejected if r["payload"].get("unknown")) == [
        i for i in range(200) if i % 5 == 1
    ]
    assert sorted(r["payload"]["id"] for r in rejected if "unknown" not in r["payload"]) == sorted(
        f"x{i}" for i in range(200) if i % 5 == 0
    )
    assert all(r["error"] for r in rejected)


def test_the_unconverted_are_counted(tmp_path):
    server = Server("--format", "parquet", "--batch-max-age", "0.1", cwd=tmp_path)
    # A type change, and an object Parquet cannot store: no row of the batch gives "o" a field.
    assert send_plain(server, [{"a": 1}, {"a": "text"}, {"a": 2}, {"o": {}}]) == 4

    def metrics() -> str:
        return request(server.port, "GET", "/metrics")[2].decode()

    assert wait_until(lambda: "fastingest_payloads_uploaded_total 4.0" in metrics())
    assert "fastingest_payloads_unconverted_total 2.0" in metrics()
    assert "fastingest_objects_uploaded_total 2.0" in metrics()  # the file and its rejects
    assert server.stop() == 0


def send_plain(server: Server, payloads: list[dict[str, Any]]) -> int:
    acked = 0
    for start in range(0, len(payloads), 40):
        body = json.dumps(payloads[start : start + 40]).encode()
        status, _, answer = server.post(body)
        assert status == 202, answer
        acked += answer["accepted"]
    return acked


def landed_parquet(s3: Any, bucket: str) -> tuple[Counter[bytes], list[str]]:
    """Each row of every Parquet object (and each rejected payload) as compact JSON."""
    payloads: Counter[bytes] = Counter()
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for entry in page.get("Contents", []):
            keys.append(entry["Key"])
            body = s3.get_object(Bucket=bucket, Key=entry["Key"])["Body"].read()
            if entry["Key"].endswith(".parquet"):
                rows = pq.read_table(io.BytesIO(body)).to_pylist()
                payloads.update(orjson.dumps({k: v for k, v in r.items()}) for r in rows)
            else:
                for line in unpack(body).splitlines():
                    payloads[orjson.dumps(json.loads(line)["payload"])] += 1
    return payloads, keys


@pytest.mark.slow
def test_kill_9_under_load_lands_each_parquet_object_once(tmp_path, s3, bucket, s3_env):
    rng = random.Random(20261206)
    args = [
        "--sink",
        f"s3://{bucket}",
        "--format",
        "parquet",
        "--partition-by",
        "k",
        "--time-field",
        "t",
        "--batch-max-payloads",
        "300",
        "--batch-max-age",
        "0.3",
    ]
    acked, sent = crash_rounds(
        args,
        cwd=tmp_path,
        env=s3_env,
        rng=rng,
        rounds=6,
        pause=lambda: rng.uniform(0.3, 1.5),
        clients=8,
        per_request=10,
        fields=lambda n: b',"k":%d,"t":%d' % (n % 3, 1765000000 + n % 2 * 3600),
    )
    got, keys = landed_parquet(s3, bucket)
    assert all(n == 1 for n in got.values()), "a payload landed twice"
    missing = Counter(acked) - got
    assert not missing, f"{sum(missing.values())} acknowledged payloads were lost"
    assert not got - Counter(sent), "something landed that was never sent"
    assert len(keys) == len(set(keys))
    assert all(k.endswith(".parquet") and k.startswith("k=") for k in keys)


@pytest.mark.parametrize(
    "args, fault",
    [
        (["--compression", "snappy"], "--compression snappy is for --format parquet"),
        (["--schema", "s.json"], "--schema is for --format parquet"),
        (["--format", "parquet", "--mode", "per-payload"], "--format parquet needs --mode batch"),
        (["--partition-by", "a", "--mode", "per-payload"], "need --mode batch"),
        (["--format", "parquet", "--schema", "none.json"], "--schema none.json: "),
    ],
)
def test_options_that_do_not_go_together_are_refused_at_start(tmp_path, capsys, args, fault):
    from fastingest.cli import main
    from fastingest.supervisor import EX_CONFIG

    assert main(["serve", "--data-dir", str(tmp_path), *args]) == EX_CONFIG
    err = capsys.readouterr().err
    assert fault in err and err.count("\n") == 1, err


def test_parquet_without_pyarrow_is_one_line(monkeypatch):
    import sys

    from fastingest.config import Settings

    monkeypatch.setitem(sys.modules, "pyarrow.json", None)  # as if it were not installed
    with pytest.raises(ValueError, match=r"pip install 'fastingest\[parquet\]'"):
        Settings(format="parquet").check()
