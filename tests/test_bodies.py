"""bodies.parse on its own: what is stored for each body shape, integers past 64 bits,
repeated member names, and that any body gives payloads or a refusal."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastingest.bodies import BodyError, parse

IN_RANGE = range(-(2**63), 2**64)
INTEGERS = st.integers(min_value=-(2**70), max_value=2**70) | st.integers(-(10**40), 10**40)


@given(INTEGERS)
def test_one_line_payloads_keep_every_integer_as_sent(n):
    payload = b'{"id":"a","n":%d}' % n
    for body in (b'{"version":"1","data":[%s]}' % payload, b"[%s]" % payload, payload):
        assert parse(body, "application/json").chunk == payload + b"\n"


@given(INTEGERS)
def test_a_re_serialised_integer_is_kept_exactly_or_refused(n):
    # A payload spanning lines is re-serialised by orjson, which reads big integers as floats.
    for body in (b'{"data":[{"n":\n%d}]}' % n, b'[{"n":\n%d}]' % n, b'{\n"n": %d\n}' % n):
        if n in IN_RANGE:
            assert parse(body, "application/json").chunk == b'{"n":%d}\n' % n
        else:
            with pytest.raises(BodyError) as caught:
                parse(body, "application/json")
            assert caught.value.error == "integer_out_of_range"


def test_long_digit_runs_inside_strings_are_not_integers():
    body = b'{"data":[{"id":"123456789012345678901234567890",\n"n":1}]}'
    assert orjson.loads(parse(body, "application/json").chunk)["n"] == 1


@pytest.mark.parametrize(
    ("body", "chunk", "token"),
    [
        (b' {"data": [ {"a": 1} , {"b": [2]} ], "token": "t"} ', b'{"a": 1}\n{"b": [2]}\n', "t"),
        (b'[{"a":"\\u00e9"},{}]', b'{"a":"\\u00e9"}\n{}\n', None),
        (b'{"a": 1.5}\n', b'{"a": 1.5}\n', None),
        (b'{"token": "t", "a": 1}', b'{"token": "t", "a": 1}\n', None),  # no data: no token
        (b'{"data":[{"a":1e2}]}', b'{"a":100.0}\n', None),  # an exponent: orjson's path
        (b'{"data":[{"a":\r\n1}]}', b'{"a":1}\n', None),  # spans lines: re-serialised
    ],
)
def test_what_is_stored(body, chunk, token):
    payloads = parse(body, "application/json")
    assert (payloads.chunk, payloads.token) == (chunk, token)


def _zstd_in_blocks(lines: list[bytes]) -> tuple[bytes, int]:
    """A streamed zstd frame of `lines`, and where its first block ends."""
    import zstandard

    c = zstandard.ZstdCompressor(level=1).compressobj()
    first = c.compress(b"".join(lines[:1024])) + c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    return first + c.compress(b"".join(lines[1024:])) + c.flush(), len(first)


def test_zstd_bodies_are_whole_or_refused():
    import zstandard

    from fastingest.bodies import decompress

    lines = [b'{"n":%d}\n' % i for i in range(4096)]
    raw = b"".join(lines)
    frame, first_block = _zstd_in_blocks(lines)
    assert decompress(frame, "zstd", 1 << 20) == raw
    assert decompress(frame + frame, "zstd", 1 << 20) == raw + raw  # two frames
    for cut in (first_block, len(frame) // 2, len(frame) - 1):
        with pytest.raises(BodyError) as truncated:
            decompress(frame[:cut], "zstd", 1 << 20)
        assert (truncated.value.status, truncated.value.error) == (400, "bad_encoding")
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (256 << 20))
    with pytest.raises(BodyError) as inflated:
        decompress(bomb, "zstd", 1 << 20)
    assert inflated.value.status == 413


# --- member names must not repeat (RFC 7493) ------------------------------------------

JSON, NDJSON = "application/json", "application/x-ndjson"


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (b'{"data":[{"id":1},{"id":2,"id":3}]}', "$.data[1]"),
        (b'[{"user":{"name":"a","name":"b"}}]', "$[0].user"),
        (b'{"id":1,"id":1}', "$"),
        (b'[{"a":1,"\\u0061":2}]', "$[0]"),  # one name spelt two ways
        (b'[{"list":[{"x":1e5,"x":1}]}]', "$[0].list[0]"),  # a body the splitter leaves alone
        (b'[{"odd key":{"k":1,"k":2}}]', '$[0]["odd key"]'),
    ],
)
def test_a_payload_that_repeats_a_name_is_refused_with_where(body, path):
    with pytest.raises(BodyError) as caught:
        parse(body, JSON)
    assert (caught.value.status, caught.value.error) == (400, "duplicate_key")
    assert caught.value.where == {"path": path}
    assert path in caught.value.detail and "RFC 7493" in caught.value.detail


@pytest.mark.parametrize(
    "body",
    [
        b'{"version":"1","version":"2","data":[{"a":1}]}',
        b'{"data":[{"a":1}],"data":[{"b":2}]}',
        b'{"token":"a","data":[{"a":1}],"token":"b"}',
        b'{"data":[{"a":1}],"d\\u0061ta":[{"b":2}]}',
    ],
)
@pytest.mark.parametrize("unique", [True, False])
def test_a_collection_that_repeats_its_own_name_is_always_refused(body, unique):
    with pytest.raises(BodyError) as caught:
        parse(body, JSON, unique)
    assert caught.value.error == "duplicate_key" and caught.value.where == {"path": "$"}


def test_with_duplicates_allowed_a_payload_is_stored_as_sent():
    for body, chunk in [
        (b'{"data":[{"id":2,"id":3}]}', b'{"id":2,"id":3}\n'),
        (b'[{"a":1,"\\u0061":2}]', b'{"a":1,"\\u0061":2}\n'),
        (b'{"id":1,"id":1}', b'{"id":1,"id":1}\n'),
    ]:
        assert parse(body, JSON, unique=False).chunk == chunk
    ndjson = b'{"a":1}\n{"b":1,"b":2}\n'
    assert parse(ndjson, NDJSON, unique=False).chunk == ndjson


def test_an_ndjson_line_that_repeats_a_name_is_refused_with_its_line():
    body = b'{"a":1}\n{"a":1,"b":{"c":1}}\n\n{"x":[{"y":1,"y":2}]}\n'
    with pytest.raises(BodyError) as caught:
        parse(body, NDJSON)
    assert caught.value.where == {"path": "$.x[0]", "line": 4}
    assert "on line 4" in caught.value.detail


def test_names_that_only_look_alike_are_not_repeats():
    for body in [
        b'[{"a":1,"A":2,"a ":3,"\\u00e9":4,"e\\u0301":5}]',
        b'[{"a":{"a":{"a":1}},"b":[{"a":1},{"a":2}]}]',
    ]:
        assert parse(body, JSON).count == 1
    assert parse(b'{"a":1}\n{"a":2}\n', NDJSON).count == 2


@pytest.mark.parametrize("depth", [300, 1000])
def test_a_payload_too_deep_to_re_serialise_or_check_is_refused_not_a_failure(depth):
    nested = b"[" * depth + b"]" * depth
    for body in (b'[{"a":' + nested + b"}]", b'{"a":\n' + nested + b"}"):  # the orjson path
        with pytest.raises(BodyError) as caught:
            parse(body, JSON)
        assert (caught.value.status, caught.value.error) == (400, "too_deep")
    one_line = b'{"a":' + nested + b"}\n"
    if depth < 900:  # NDJSON is stored as sent: only the name check parses it
        assert parse(one_line, NDJSON).chunk == one_line
    else:
        with pytest.raises(BodyError, match="too deeply"):
            parse(one_line, NDJSON)


# Objects as member lists, so that names may repeat; rendered on one line or several.
NAMES = st.sampled_from(["a", "b", "id", "data", "token", "\\u0061", "é"])
LEAVES = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(-1e300, 1e300)
TREES = st.recursive(
    LEAVES | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.lists(st.tuples(NAMES, inner), max_size=3),
    max_leaves=10,
)


def _render(value: Any, newline: bool) -> str:
    sep = ",\n" if newline else ","
    if isinstance(value, list) and value and all(isinstance(v, tuple) for v in value):
        return "{" + sep.join(f'"{k}":{_render(v, newline)}' for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + sep.join(_render(v, newline) for v in value) + "]"
    return json.dumps(value)


@given(
    st.lists(TREES, min_size=1, max_size=3),
    st.integers(0, 300),
    st.booleans(),
    st.sampled_from(["array", "collection", "ndjson"]),
    st.booleans(),
)
def test_any_body_is_payloads_or_a_refusal(trees, depth, newline, form, unique):
    payloads = ["[" * depth + _render(t, newline) + "]" * depth for t in trees]
    payloads = [p if p.startswith("{") else '{"p":' + p + "}" for p in payloads]
    if form == "ndjson":
        body, kind = "\n".join(p.replace("\n", " ") for p in payloads), NDJSON
    elif form == "array":
        body, kind = "[" + ",".join(payloads) + "]", JSON
    else:
        body, kind = '{"data":[' + ",".join(payloads) + "]}", JSON
    try:
        got = parse(body.encode(), kind, unique)
    except BodyError:
        return
    lines = got.chunk.split(b"\n")
    assert lines[-1] == b"" and len(lines) - 1 == got.count == len(payloads)
    assert all(type(orjson.loads(line)) is dict for line in lines[:-1])
