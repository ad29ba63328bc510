"""NDJSON lines -> Parquet: what fits is one file readers take as it is; what does not fit
comes back, each line with its reason, in the batch's order."""

from __future__ import annotations

import datetime as dt
import io
import json

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastingest.parquet import (
    CELLS_PER_VALUE,
    FREE_CELLS,
    MAX_FIELDS,
    ROW_GROUP_ROWS,
    ParquetWriter,
    load_schema,
    reject_line,
)


def lines(*payloads: object) -> list[bytes]:
    return [json.dumps(p, ensure_ascii=False).encode() + b"\n" for p in payloads]


def _lines_of(rejects: list[tuple[bytes, str]]) -> set[bytes]:
    return {line for line, _ in rejects}


def read(body: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(body))


def test_an_inferred_batch_keeps_types_nesting_unicode_and_64_bit_integers():
    sent = [
        {"id": i, "big": 2**63 - 1 - i, "neg": -(2**63) + i, "name": f"zoë-日本-{i}",
         "ok": i % 2 == 0, "tags": ["a", f"t{i}"], "user": {"geo": {"lat": 1.5 + i}}, "none": None}
        for i in range(50)
    ]  # fmt: skip
    body, rows, rejects = ParquetWriter("zstd").convert(b"".join(lines(*sent)))
    assert rows == 50 and rejects == []
    table = read(body)
    assert table.schema.field("big").type == pa.int64()
    geo = pa.struct([("lat", pa.float64())])
    assert table.schema.field("user").type == pa.struct([("geo", geo)])
    assert table.to_pylist() == sent
    meta = pq.ParquetFile(io.BytesIO(body)).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert body[:4] == b"PAR1" and body[-4:] == b"PAR1"  # no compression around the file


@pytest.mark.parametrize("compression", ["snappy", "gzip", "none"])
def test_page_compressions(compression):
    batch = b"".join(lines(*({"a": i} for i in range(10))))
    body, rows, _ = ParquetWriter(compression).convert(batch)
    codec = pq.ParquetFile(io.BytesIO(body)).metadata.row_group(0).column(0).compression
    assert rows == 10 and codec == {"none": "UNCOMPRESSED"}.get(compression, compression.upper())


def test_row_groups_are_bounded():
    n = ROW_GROUP_ROWS + 10
    body, rows, _ = ParquetWriter("zstd").convert(b"".join(b'{"a":%d}\n' % i for i in range(n)))
    meta = pq.ParquetFile(io.BytesIO(body)).metadata
    assert rows == n and meta.num_row_groups == 2
    assert max(meta.row_group(i).num_rows for i in range(2)) == ROW_GROUP_ROWS


def test_misfits_of_an_inferred_batch_come_back_in_order_with_their_reason():
    batch = [
        *lines({"a": 1}, {"a": "text"}, {"a": 2.5}, {"a": 3}),
        b"[1,2]\n",
        b'{"a":123456789012345678901}\n',
        b'{"a":4,"id":"12345678901234567890123"}\n',  # a long digit run in a string fits
    ]
    body, rows, rejects = ParquetWriter("zstd").convert(b"".join(batch))
    assert [r[0] for r in rejects] == [batch[1], batch[4], batch[5]]
    assert "changed from number to string" in rejects[0][1]
    assert rejects[1][1].startswith("not a JSON object")
    assert rejects[2][1] == "an integer outside the 64-bit range"
    table = read(body)
    assert rows == 4 and table.column("a").to_pylist() == [1.0, 2.5, 3.0, 4.0]
    assert table.column("id").to_pylist() == [None, None, None, "12345678901234567890123"]


@pytest.mark.parametrize(
    "schema",
    [
        None,
        pa.schema([("a", pa.float64()), ("l", pa.list_(pa.float64())),
                   ("s", pa.struct([("x", pa.float64())]))]),
        pa.schema([("a", pa.float64()), ("l", pa.list_(pa.uint64())),
                   ("s", pa.struct([("x", pa.float64())]))]),
    ],
    ids=["inferred", "floats", "uint64"],
)  # fmt: skip
def test_an_integer_past_64_bits_is_a_misfit_wherever_it_hides(schema):
    # Read alone, each batch fits: pyarrow would keep the integer as a double.
    fine = lines({"a": 1.5, "l": [1], "s": {"x": 1e19}}, {"a": 2, "l": [], "s": None})
    for bad in (b'{"a":-9223372036854775809}\n', b'{"l":[1, 18446744073709551616]}\n',
                b'{"s":{"x":100000000000000000000}}\n'):  # fmt: skip
        body, rows, rejects = ParquetWriter("zstd", schema).convert(b"".join([*fine, bad]))
        assert rejects == [(bad, "an integer outside the 64-bit range")]
        table = read(body)
        assert rows == 2 and table.column("s").to_pylist() == [{"x": 1e19}, None]


def test_an_object_with_no_member_parquet_cannot_store_is_a_misfit():
    # Parquet has no group without a field: "o" can be stored only where a row gives it one.
    batch = [*lines({"o": {}, "a": 1}, {"a": 2}, {"l": [{}]}, {"s": {"t": {}}}), b'{"o":{}}\n']
    body, rows, rejects = ParquetWriter("zstd").convert(b"".join(batch))
    assert [r[0] for r in rejects] == batch[:1] + batch[2:]
    assert all("no member" in why for _, why in rejects)
    assert rows == 1 and read(body).to_pylist() == [{"a": 2}]
    kept = lines({"o": {}}, {"o": {"x": 1}}, {"o": None})
    body, rows, rejects = ParquetWriter("zstd").convert(b"".join(kept))
    assert rejects == [] and read(body).column("o").to_pylist() == [{"x": None}, {"x": 1}, None]


def test_a_payload_read_beside_a_misfit_keeps_its_fields():
    # Halving reads {"a": true} and {"b": 1} as one run, whose "a" conflicts with the first.
    batch = lines({"a": [1]}, {"a": True}, {"b": 1})
    body, rows, rejects = ParquetWriter("zstd").convert(b"".join(batch))
    assert rows == 2 and [r[0] for r in rejects] == [batch[1]] and "changed" in rejects[0][1]
    assert read(body).to_pylist() == [{"a": [1], "b": None}, {"a": None, "b": 1}]


def test_a_list_that_starts_with_a_null_keeps_every_element():
    # pyarrow's inference mislays such a null; the batch would not convert at all.
    batch = lines({"at": "2026-12-06T10:00:00", "tags": [None, "a"]}, {"tags": ["b", None]})
    body, rows, rejects = ParquetWriter("zstd").convert(b"".join(batch))
    assert rejects == [] and rows == 2
    assert read(body).column("tags").to_pylist() == [[None, "a"], ["b", None]]
    # A list of nulls alone pyarrow's reader cannot read at all: a misfit that says so.
    batch = lines({"at": "2026-12-06T10:00:00", "tags": [None, None]})
    assert ParquetWriter("zstd").convert(b"".join(batch))[2] == [
        (batch[0], "a list of nulls, which pyarrow's JSON reader misreads (apache/arrow#51305)")
    ]


def _cells(body: bytes) -> int:
    meta = pq.ParquetFile(io.BytesIO(body)).metadata
    return meta.num_rows * meta.num_columns


def test_a_batch_of_ever_new_field_names_is_cut_down_to_a_dense_table():
    # 3,000 payloads of 50 names never seen before: read whole, 150,000 columns of 3,000
    # rows, minutes and gigabytes; here the payloads that would make it so are misfits.
    hostile = [
        json.dumps({f"k{i}_{j}": j for j in range(50)}).encode() + b"\n" for i in range(3000)
    ]
    plain = b'{"k0_0":1}\n'
    batch = [*hostile[:1500], plain, *hostile[1500:]]
    body, rows, rejects = ParquetWriter("zstd").convert(b"".join(batch))
    assert rows + len(rejects) == len(batch)
    assert all(r[1].startswith("too sparse for columns") for r in rejects)
    assert plain not in _lines_of(rejects)  # no new field: it fits what is kept
    table = read(body)
    assert table.num_columns <= MAX_FIELDS and table.num_rows == rows
    values = sum(len(orjson.loads(line)) + 1 for line in batch if line not in _lines_of(rejects))
    assert _cells(body) <= CELLS_PER_VALUE * values + FREE_CELLS


def test_repeats_of_a_sparse_line_share_its_fate_and_a_dense_batch_is_untouched():
    cycle = [json.dumps({f"f{(i * 8 + j) % 1000}": j for j in range(8)}).encode() + b"\n"
             for i in range(125)]  # fmt: skip
    batch = cycle * 160  # 20,000 rows over 1,000 fields, 8 each
    body, rows, rejects = ParquetWriter("zstd").convert(b"".join(batch))
    kept = {line for line in cycle if line not in _lines_of(rejects)}
    assert rows == 160 * len(kept) and len(rejects) == 160 * (len(cycle) - len(kept))
    assert read(body).num_rows == rows
    assert 0 < len(kept) < len(cycle)
    dense = [json.dumps({"a": i, "b": {"c": [i, i]}}).encode() + b"\n" for i in range(20_000)]
    _, rows, rejects = ParquetWriter("zstd").convert(b"".join(dense))
    assert rows == 20_000 and rejects == []


def test_a_schema_fixes_columns_and_sends_what_does_not_fit_to_the_rejects(tmp_path):
    spec = {
        "fields": [
            {"name": "id", "type": "int64", "nullable": False},
            {"name": "at", "type": "timestamp"},
            {"name": "small", "type": "int8"},
            {"name": "tags", "type": {"list": "string"}},
            {"name": "geo", "type": {"struct": [{"name": "lat", "type": "float64"}]}},
        ]
    }
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(spec))
    schema = load_schema(path)
    batch = lines(
        {"id": 1, "at": "2026-12-06T10:00:00.123456Z", "small": 5, "tags": ["x"],
         "geo": {"lat": 1.5}},
        {"id": 2},
        {"id": 3, "small": 300},
        {"id": 4, "extra": True},
        {"at": "2026-12-06T10:00:00Z"},
        {"id": 5, "tags": "not a list"},
    )  # fmt: skip
    body, rows, rejects = ParquetWriter("zstd", schema).convert(b"".join(batch))
    assert [r[0] for r in rejects] == [batch[2], batch[3], batch[4], batch[5]]
    assert "int8" in rejects[0][1] and "unexpected field" in rejects[1][1]
    table = read(body)
    assert rows == 2 and table.schema == schema
    at = table.column("at").to_pylist()[0]
    assert at == dt.datetime(2026, 12, 6, 10, 0, 0, 123456, tzinfo=dt.UTC)
    assert table.schema.field("at").type == pa.timestamp("us", tz="UTC")
    assert table.to_pylist()[1] == {
        "id": 2, "at": None, "small": None, "tags": None, "geo": None
    }  # fmt: skip


def test_nothing_fits_no_parquet_body():
    body, rows, rejects = ParquetWriter("zstd").convert(b'[1]\n"x"\n')
    assert (body, rows, len(rejects)) == (b"", 0, 2)


def test_a_reject_line_is_json_with_the_payload_as_sent():
    line = reject_line(b'{"a":"\\u00e9"}\n', 'why "quoted"')
    assert line.endswith(b"\n")
    assert json.loads(line) == {"error": 'why "quoted"', "payload": {"a": "é"}}
    assert b'"payload":{"a":"\\u00e9"}' in line  # the bytes as sent


@pytest.mark.parametrize(
    "text, fault",
    [
        ("{}", "expected"),
        ('{"fields": [{"name": "a"}]}', "needs a string name and a type"),
        ('{"fields": [{"name": "a", "type": "int128"}]}', "unknown type 'int128'"),
        ('{"fields": [{"name": "a", "type": "int8"}, {"name": "a", "type": "int8"}]}', "twice"),
        ('{"fields": [{"name": "a", "type": {"list": "nope"}}]}', "$.a[]: unknown type"),
        ('{"fields": [{"name": "a", "type": {"struct": []}}]}', "$.a: a struct needs a field"),
        ("not json", "--schema"),
    ],
)
def test_a_bad_schema_file_is_one_clear_line(tmp_path, text, fault):
    path = tmp_path / "schema.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="--schema") as caught:
        load_schema(path)
    assert fault in str(caught.value) and "\n" not in str(caught.value)


values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from("abc"), values, max_size=3), max_size=30))
def test_every_line_is_a_row_or_a_reject_exactly_once(payloads):
    batch = lines(*payloads)
    body, rows, rejects = ParquetWriter("zstd").convert(b"".join(batch))
    assert rows + len(rejects) == len(batch)
    assert rows == (read(body).num_rows if body else 0)
    rejected = [r[0] for r in rejects]
    assert rejected == [ln for ln in batch if ln in rejected]  # in the batch's order
