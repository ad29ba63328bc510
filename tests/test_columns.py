"""The column reader: where it reads a batch, it gives pyarrow's JSON reader's table.

Both twins return the same buffers for every input (``_columns_py.py`` is the
specification); a table made from them equals what ``pyarrow.json.read_json`` makes
of the batch, and a batch it leaves alone (None) is one pyarrow's reader may read
differently or refuse. ``ParquetWriter`` writes the same bytes either way.
"""

from __future__ import annotations

import io
import json
import string

import pyarrow as pa
import pyarrow.json as pj
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fastingest import _columns_py, columns, parquet
from fastingest.parquet import CELLS_PER_VALUE, FREE_CELLS, MAX_FIELDS, ParquetWriter
from fastingest.split import shape

try:
    from fastingest import _columns as _columns_c
except ImportError:  # pragma: no cover - only without a compiler
    _columns_c = None  # type: ignore[assignment]

READERS = [pytest.param(_columns_py.read, id="py")]
if _columns_c is not None:
    READERS.insert(0, pytest.param(_columns_c.read, id="c"))

LIMITS = (MAX_FIELDS, CELLS_PER_VALUE, FREE_CELLS)


def _pyarrow(batch: bytes, schema: pa.Schema | None = None) -> pa.Table | None:
    try:
        return pj.read_json(
            io.BytesIO(batch),
            read_options=pj.ReadOptions(use_threads=False, block_size=len(batch) + 1),
            parse_options=pj.ParseOptions(newlines_in_values=False, explicit_schema=schema),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return None


def _read(batch: bytes, limits: tuple[int, int, int] = LIMITS) -> pa.Table | None:
    """The table both twins read, checked against pyarrow's reader and split.shape."""
    py = _columns_py.read(batch, *limits)
    if _columns_c is not None:
        assert _columns_c.read(batch, *limits) == py, batch
    found = columns.to_table(py)
    if found is None:
        return None
    measured, table = found
    table.validate(full=True)
    rows, fields, values = shape(batch, limits[0]) or (0, 0, 0)
    # shape tells names apart by their spelling, the reader by what they decode to.
    assert measured[0] == rows and measured[1] <= fields and measured[2] == values, batch
    want = _pyarrow(batch)
    assert want is not None, batch
    try:
        want.validate(full=True)
    except pa.ArrowInvalid:  # pyarrow's inference can mislay a list's leading nulls
        want = _pyarrow(batch, table.schema)
        assert want is not None, batch
    assert table.schema == want.schema, (batch, table.schema, want.schema)
    assert table.equals(want), batch
    return table


def _batch(*lines: str) -> bytes:
    return "".join(line + "\n" for line in lines).encode()


@pytest.mark.parametrize(
    "lines",
    [
        ['{"a":1}', '{"a":1.5}'],  # integers and doubles: doubles
        ['{"a":1.5}', '{"a":9007199254740993}'],
        ['{"b":1}', '{"a":{"x":1}}'],  # a field first seen late: null before
        ['{"a":{"x":1}}', '{"a":null}', "{}"],  # a null struct, a missing one
        ['{"a":[{"x":1},{"y":"s"}]}'],  # a list of structs, fields merged
        ['{"a":[]}'],  # list<null>
        ['{"a":[]}', '{"a":[1]}'],
        ['{"a":null}'],  # the null type
        ['{"a":[1,null,2]}', '{"a":null}'],
        ['{"a":{}}'],
        ['{"a":[[1],[2,3]],"b":[[]]}'],
        ['{"a":-0,"b":-0.0,"c":1e-400,"d":1.7976931348623157e308}'],
        ['{"a":-9223372036854775808,"b":9223372036854775807}'],
        ['{"a":"\\u00e9\\n\\"\\\\\\/\\b\\f\\r\\t\\ud83d\\ude00","b":"é😀"}'],
        ['{"\\u0061":1}', '{"a":2}', '{"é":{"\\u00e9":true}}'],  # names decoded
        ['{"a":true}', '{"a":null}', '{"a":false}', '{"b":false}'],
        [' { "a" : [ 1 , 2 ] , "b" : "x" } ', '\t{"b":"y","a":[]}\r'],
        ['{"l":[null,0]}'],  # pyarrow's inference mislays the leading null: see _read
        ['{"t":"12:00:00","u":"2024","v":"20245-"}'],  # not a date's start
        # Names alike in their first 8 bytes, or longer than a node keeps beside it.
        ['{"abcdefghij":1,"abcdefghik":2}', '{"abcdefghik":3,"abcdefghij":4,"abcdefgh":5}'],
        ['{"' + "n" * 30 + '":1}', '{"' + "n" * 31 + '":2,"' + "n" * 30 + '":3}'],
        ['{"a":{"bcdefghijklmnopq":1}}'],  # a name that ends near its line's end
        ['{"d":"\u0032024"}', '{"d":"2\u00302"}'],  # escaped digits, no date
    ],
)
def test_a_batch_reads_as_pyarrow_reads_it(lines):
    assert _read(_batch(*lines)) is not None


@pytest.mark.parametrize(
    "lines",
    [
        ['{"a":1}', '{"a":"s"}'],  # a type changed: pyarrow refuses it
        ['{"a":true}', '{"a":1}'],
        ['{"a":{"x":1}}', '{"a":[1]}'],
        ['{"a":"2024-01-01"}'],  # pyarrow makes it a timestamp
        ['{"a":"x"}', '{"a":"2024-01-01T00:00:00Z"}'],
        ['{"a":"\u0032024-01-01"}'],  # a date spelt with an escape
        ['{"a":1,"a":2}'],
        ['{"a":{"b":1,"\\u0062":2}}'],  # one name, spelt two ways
        ['{"a":9223372036854775808}'],
        ['{"a":-9223372036854775809}'],
        ['{"a":123456789012345678901234}'],
        ['{"a":1e400}'],
        ['{"a":"\\ud800"}'],
        ['{"a":"\\udc00\\ud800"}'],
        ["[1]"],  # a row is an object
        ['"s"'],
        ["{}", "{}"],  # no field in any line
        ['{"a":' + "[" * 130 + "]" * 130 + "}"],  # deeper than MAX_DEPTH
        ['{"a":1}', ""],
    ],
)
def test_a_batch_pyarrow_may_read_otherwise_is_left_to_it(lines):
    assert _read(_batch(*lines)) is None


def test_a_cut_last_line_or_an_empty_batch_is_left_to_pyarrow():
    assert _read(b'{"a":1}\n{"a":2}') is None
    assert _read(b"") is None


def test_past_the_field_limit_or_too_many_null_slots_it_stops():
    wide = _batch(*(json.dumps({f"f{i}": 1}) for i in range(50)))
    assert _read(wide, (49, CELLS_PER_VALUE, FREE_CELLS)) is None
    assert _read(wide, (50, CELLS_PER_VALUE, FREE_CELLS)) is not None
    # Each line's new field gets a slot in every row: 50 x 50 slots for 100 values.
    assert _read(wide, (50, 1, 1_000)) is None
    assert _read(wide, (50, 1, 3_000)) is not None
    nested = _batch('{"a":[' + ",".join(f'{{"k{i}":1}}' for i in range(40)) + "]}")
    assert _read(nested, (MAX_FIELDS, 1, 100)) is None  # elements x their fields
    assert _read(nested) is not None


KEYS = st.sampled_from(
    ["a", "b", "c", "é", "a b", "\u2603", "abcdefghi", "abcdefghj", "k" * 24, "k" * 25]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=8)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=8,
)
# Fields of one kind each, as a steady stream's are, so that most batches are read.
TYPED = st.fixed_dictionaries(
    {},
    optional={
        "i": st.integers(-(2**63), 2**63 - 1) | st.none(),
        "f": st.floats(allow_nan=False, allow_infinity=False) | st.integers(-5, 5),
        # Letters only: a string that starts as a date does is pyarrow's to read.
        "s": st.text(string.ascii_letters + "é ☃", max_size=6) | st.none(),
        "o": st.fixed_dictionaries({}, optional={"x": st.booleans(), "y": st.text(max_size=3)}),
        "l": st.lists(st.integers(-9, 9) | st.none(), max_size=3) | st.none(),
        "n": st.lists(st.fixed_dictionaries({}, optional={"z": st.integers(0, 9)}), max_size=2),
    },
)
ENCODINGS = st.sampled_from(
    [
        {"separators": (",", ":"), "ensure_ascii": False},
        {"separators": (", ", ": ")},  # \u escapes, surrogate pairs included
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(VALUES | TYPED, min_size=1, max_size=12), ENCODINGS)
@example([{"a": 1}, {"a": 2.5}, {"a": None}], {"separators": (",", ":")})
def test_any_batch_is_read_as_pyarrow_reads_it_or_left_to_it(payloads, encoding):
    _read(b"".join(json.dumps(p, **encoding).encode() + b"\n" for p in payloads))


@settings(max_examples=100, deadline=None)
@given(st.lists(TYPED, min_size=1, max_size=20), ENCODINGS)
def test_a_batch_of_steady_fields_is_read(payloads, encoding):
    batch = b"".join(json.dumps(p, **encoding).encode() + b"\n" for p in payloads)
    assert _read(batch) is not None or not any(payloads)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.dictionaries(KEYS, VALUES, max_size=4) | TYPED, min_size=1, max_size=12))
@example([{"l": [None, None]}, {"a": 1}])
@example([{"o": {}, "l": [None, None]}])  # pyarrow reads it, Parquet cannot store "o"
@example([{"d": "2026-12-06", "l": [None, None]}])  # a date: pyarrow reads it
def test_the_parquet_object_is_the_same_whichever_reader_read_the_batch(payloads):
    # Payloads are objects: the front end refuses others for Parquet (and pyarrow's
    # reader crashes on a batch that starts with a null).
    batch = b"".join(json.dumps(p).encode() + b"\n" for p in payloads)
    writer = ParquetWriter("zstd")
    fast = writer.convert(batch)
    original = parquet.read_table
    parquet.read_table = lambda *args: None  # pyarrow's reader for every batch
    try:
        slow = writer.convert(batch)
    finally:
        parquet.read_table = original
    if any("apache/arrow#51305" in why for _, why in slow[2]):
        # pyarrow's reader cannot read a list of nulls alone: such payloads are misfits
        # on its path, rows on this one where nothing else sends them to pyarrow's.
        assert fast[1] + len(fast[2]) == len(payloads)
        assert {line for line, _ in fast[2]} <= {line for line, _ in slow[2]}
    else:
        assert slow == fast
