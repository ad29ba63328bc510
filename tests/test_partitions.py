"""Payload fields -> Hive key segments: every value one safe segment that decodes back."""

from __future__ import annotations

import json
import time
from urllib.parse import quote, unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastingest.partitions import (
    DEFAULT_PARTITION,
    MAX_VALUE_CHARS,
    Partitioner,
    encode_value,
    event_time,
    parse_fields,
)


@given(st.text(min_size=1))
def test_any_string_is_one_safe_segment_that_decodes_back(value):
    encoded = encode_value(value)
    assert "/" not in encoded and "=" not in encoded and all(" " < c < "\x7f" for c in encoded)
    assert len(encoded) <= MAX_VALUE_CHARS
    if len(quote(value, safe="")) <= MAX_VALUE_CHARS:  # not cut
        assert unquote(encoded) == value
    else:  # cut: a prefix that decodes, then "~" and the hash
        whole, _, digest = encoded.rpartition("~")
        assert len(digest) == 16 and value.startswith(unquote(whole))


def test_values_as_json_writes_them_and_the_default_partition():
    assert encode_value(42) == "42" and encode_value(2.5) == "2.5" and encode_value(True) == "true"
    assert encode_value({"a": [1]}) == "%7B%22a%22%3A%5B1%5D%7D"
    assert encode_value(None) == encode_value("") == DEFAULT_PARTITION
    assert encode_value("a/b é") == "a%2Fb%20%C3%A9"


def test_long_values_are_cut_but_stay_apart():
    a, b = encode_value("x" * 500 + "a"), encode_value("x" * 500 + "b")
    assert a != b and len(a) <= MAX_VALUE_CHARS and len(b) <= MAX_VALUE_CHARS
    assert unquote(encode_value("é" * 100).rpartition("~")[0]) == "é" * 18


@pytest.mark.parametrize(
    "value, seconds",
    [
        (1765000000, 1765000000.0),
        (1765000000.5, 1765000000.5),
        (1765000000123, 1765000000.123),
        ("2026-12-06T10:00:00Z", 1796551200.0),
        ("2026-12-06T11:00:00+01:00", 1796551200.0),
        ("2026-12-06T10:00:00.250", 1796551200.25),
        ("yesterday", None),
        (True, None),
        (None, None),
        ({"t": 1}, None),
        (-5, None),
        (10**15 * 1000, None),
    ],
)
def test_event_times(value, seconds):
    got = event_time(value)
    assert got == pytest.approx(seconds) if seconds is not None else got is None


def test_a_chunk_splits_by_field_and_event_hour_with_arrival_time_as_the_fallback():
    p = Partitioner(["country", "user.tier"], "ts")
    chunk = b"".join(
        json.dumps(x).encode() + b"\n"
        for x in [
            {"country": "DE", "user": {"tier": 1}, "ts": 1765000000},
            {"country": "DE", "user": {"tier": 1}, "ts": "2025-12-06T05:59:59Z"},
            {"country": "FR", "ts": "not a time"},
            {"user": "flat", "ts": 1765000000000},
        ]
    )
    received = time.mktime((2026, 1, 2, 3, 0, 0, 0, 0, 0)) - time.timezone
    parts, fallbacks = p.split(chunk, received)
    lines = chunk.split(b"\n")
    assert fallbacks == 1
    assert parts == {
        "country=DE/user_tier=1/dt=2025-12-06/hour=05/": [lines[0] + b"\n", lines[1] + b"\n"],
        "country=FR/user_tier=__HIVE_DEFAULT_PARTITION__/dt=2026-01-02/hour=03/": [
            lines[2] + b"\n"
        ],
        "country=__HIVE_DEFAULT_PARTITION__/user_tier=__HIVE_DEFAULT_PARTITION__/"
        "dt=2025-12-06/hour=05/": [lines[3] + b"\n"],
    }
    assert Partitioner.from_spec(p.spec).spec == p.spec  # kept with the spool as text


def test_field_paths():
    assert parse_fields("a, b.c ,d_e") == ("a", "b.c", "d_e")
    for bad in ("a..b", "a,a", "a b", "1a", "a/b"):
        with pytest.raises(ValueError):
            parse_fields(bad)


@given(
    st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                "k": st.none()
                | st.booleans()
                | st.integers()
                | st.text(max_size=4)
                | st.lists(st.integers(), max_size=2),
                "ts": st.integers(-10, 2**70) | st.text(max_size=25) | st.floats(0, 2e9),
                "n": st.floats(allow_nan=False, allow_infinity=False) | st.integers(2**64, 2**70),
            },
        ),
        max_size=8,
    ),
    st.lists(st.booleans(), min_size=8, max_size=8),
    st.sampled_from([("k",), ("k", "n")]),
    st.sampled_from([None, "ts"]),
    st.booleans(),
)
def test_the_scanned_fields_split_a_chunk_as_parsing_it_does(
    payloads, ascii, fields, time_field, unique
):
    # "é" and "\u00e9" in one chunk: two texts of one value, whose lines interleave
    chunk = b"".join(
        json.dumps(p, ensure_ascii=a).encode() + b"\n"
        for p, a in zip(payloads, ascii, strict=False)
    )
    scanned = Partitioner(fields, time_field, unique)  # no payload here repeats a name
    parsed = Partitioner(fields, time_field)
    parsed._names = None  # as for a dotted path: every payload parsed whole
    got = scanned.split(chunk, 1765000000.0)
    want = parsed.split(chunk, 1765000000.0)
    assert got == want
    assert list(got[0]) == list(want[0])  # partitions in the order of their first line


def test_a_value_spelt_two_ways_keeps_its_partitions_lines_in_order():
    chunk = (
        b'{"k":"\xc3\xa9","i":0}\n{"k":"b","i":1}\n{"k":"\\u00e9","i":2}\n{"k":"\xc3\xa9","i":3}\n'
    )
    parts, _ = Partitioner(["k"]).split(chunk, 1765000000.0)
    assert [json.loads(ln)["i"] for ln in parts["k=%C3%A9/"]] == [0, 2, 3]
    assert [json.loads(ln)["i"] for ln in parts["k=b/"]] == [1]


def test_an_integer_past_64_bits_is_read_as_orjson_reads_it():
    p = Partitioner(["k"], "ts")
    chunk = b'{"k":123456789012345678901234567890,"ts":99999999999999999999999}\n'
    parts, fallbacks = p.split(chunk, 1765000000.0)
    assert list(parts) == ["k=1.2345678901234568e%2B29/dt=2025-12-06/hour=05/"]  # a double
    assert fallbacks == 1  # no year that far: the arrival hour
    p._names = None
    assert p.split(chunk, 1765000000.0) == (parts, fallbacks)


def test_the_spec_keeps_how_a_run_scanned_its_chunks():
    p = Partitioner(["k"], "ts", unique=True)
    again = Partitioner.from_spec(p.spec)
    assert (again.fields, again.time_field, again.unique) == (("k",), "ts", True)
    # a spec without it: its chunks may repeat a name, so lines are read whole
    assert not Partitioner.from_spec('{"fields":["k"],"time_field":null}').unique
    chunk = b'{"k":"a","k":"b"}\n'
    assert list(Partitioner(["k"]).split(chunk, 0.0)[0]) == ["k=b/"]  # as orjson reads it
