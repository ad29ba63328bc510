"""The collection splitter: both twins agree with each other, and never with less than orjson.

The compiled twin (``_split.pyx``) must return what the specification (``_split_py.py``)
returns for every input. Whatever either accepts, orjson must accept with the same
values, so that the fast path never stores what the orjson path would have refused.
"""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fastingest import _split_py

try:
    from fastingest import _split as _split_c
except ImportError:  # pragma: no cover - only without a compiler
    _split_c = None  # type: ignore[assignment]

SPLITTERS = [pytest.param(_split_py.split_payloads, id="py")]
if _split_c is not None:
    SPLITTERS.insert(0, pytest.param(_split_c.split_payloads, id="c"))

KEYS = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=8)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)
PAYLOADS = st.lists(st.dictionaries(KEYS, VALUES, max_size=5), min_size=1, max_size=5)


def _shapes(payloads: list[dict], token: object) -> list[object]:
    return [
        {"version": "1.0", "token": token, "data": payloads},
        {"data": payloads},
        payloads,
        payloads[0],
    ]


def _encodings(doc: object) -> list[bytes]:
    return [
        json.dumps(doc, separators=(",", ":")).encode(),
        json.dumps(doc).encode(),  # ", " and ": ", \\u escapes
        json.dumps(doc, ensure_ascii=False).encode(),
        json.dumps(doc, indent=1).encode(),  # payloads span lines: the orjson path
        b" \t" + json.dumps(doc, separators=(" , ", " : ")).encode() + b"\r\n",
    ]


def _both(body: bytes) -> tuple[bytes, int, str | None] | None:
    py = _split_py.split_payloads(body)
    if _split_c is not None:
        assert _split_c.split_payloads(body) == py, body
    return py


def _agrees_with_orjson(body: bytes, got: tuple[bytes, int, str | None]) -> None:
    doc = orjson.loads(body)  # raises if the splitter accepted what orjson refuses
    chunk, count, token = got
    if isinstance(doc, list):
        payloads, want_token = doc, None
    elif "data" in doc:
        payloads = doc["data"]
        want_token = doc["token"] if isinstance(doc.get("token"), str) else None
    else:
        payloads, want_token = [doc], None
    lines = chunk.split(b"\n")
    assert lines.pop() == b""
    assert count == len(lines) == len(payloads)
    assert [orjson.loads(line) for line in lines] == payloads
    assert all(line.strip() == line for line in lines)
    assert token == want_token


@settings(max_examples=300)
@given(PAYLOADS, st.none() | st.integers() | KEYS)
def test_every_encoding_of_a_valid_body(payloads, token):
    for doc in _shapes(payloads, token):
        for body in _encodings(doc):
            got = _both(body)
            if got is not None:
                _agrees_with_orjson(body, got)


@settings(max_examples=200)
@given(
    st.lists(
        st.dictionaries(
            st.text("abcdé/😀", max_size=6),  # keys a lone object's top level may hold
            st.integers(-(10**25), 10**25) | st.text('xyzé"\\\n😀', max_size=6) | st.booleans(),
            max_size=4,
        ),
        min_size=1,
        max_size=4,
    )
)
def test_plain_bodies_take_the_fast_path(payloads):
    # No exponents, no surrogate escapes, one line: the splitter must take these itself.
    for doc in _shapes(payloads, "t"):
        for separators in ((",", ":"), (", ", ": ")):  # ensure_ascii would escape 😀 as surrogates
            body = json.dumps(doc, ensure_ascii=False, separators=separators).encode()
            got = _both(body)
            assert got is not None, body
            _agrees_with_orjson(body, got)


DAMAGE = b'{}[]",:\\ 0123456789.-+eEtrufalsn\n\x00\x1f\x80\xc3\xed\xff'


@settings(max_examples=500)
@given(PAYLOADS, st.data())
def test_damaged_bodies(payloads, data):
    body = bytearray(json.dumps({"token": "t", "data": payloads}, separators=(",", ":")).encode())
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(body)))
        what = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        byte = data.draw(st.sampled_from(DAMAGE))
        if what == "insert":
            body.insert(at, byte)
        elif at < len(body):
            if what == "delete":
                del body[at]
            else:
                body[at] = byte
    got = _both(bytes(body))
    if got is not None:
        _agrees_with_orjson(bytes(body), got)


@given(st.binary(max_size=40) | st.text('{}[]",:\\ 0123456789.-eEtrufalsnu\n', max_size=40))
def test_arbitrary_bytes(raw):
    body = raw.encode() if isinstance(raw, str) else raw
    got = _both(body)
    if got is not None:
        _agrees_with_orjson(body, got)


NONE = [
    b"",
    b"  \n",
    b"[]",
    b'{"data":[]}',
    b'"s"',
    b"[1]",
    b'{"data":{"a":1}}',
    b'{"data":[{}],"data":[{}]}',
    b'{"data":[{}],"token":"a","token":"b"}',
    b'{"d\\u0061ta":[{}]}',
    b'{"data":[{}],"token":"\\u0074"}',
    b'[{"a":"\\ud83d\\ude00"}]',  # a surrogate pair: orjson's call
    b'[{"a":"\\ud800"}]',
    b'[{"a":"\xed\xa0\x80"}]',  # an encoded surrogate
    b'[{"a":"\xc0\x80"}]',  # an overlong
    b'[{"a":"\xf4\x90\x80\x80"}]',  # beyond U+10FFFF
    b'[{"a":"\x1f"}]',
    b'[{"a":1e5}]',
    b'[{"a":1E-5}]',
    b'[{"a":01}]',
    b'[{"a":1.}]',
    b'[{"a":-}]',
    b'[{"a":tru}]',
    b'[{"a":true}x]',
    b'[{"a":1},]',
    b'[{"a":1}] x',
    b"\xef\xbb\xbf[{}]",  # a BOM
    b'[{"a":\n1}]',
    b'{"a":\r1}',
    b'[{"a":' + b"1" * 101 + b"}]",
    b'[{"a":' + b"[" * 127 + b"]" * 127 + b"}]",
]
DEEP = b"[" * 126 + b"]" * 126  # with the payload and its array: 128 containers
SOME = [
    (b"{}", (b"{}\n", 1, None)),
    (b'[{"a":"\\\\ud800"}]', (b'[{"a":"\\\\ud800"}]'[1:-1] + b"\n", 1, None)),
    (b'[{"a":' + b"1" * 100 + b"}]", (b'{"a":' + b"1" * 100 + b"}\n", 1, None)),
    (b'[{"a":' + DEEP + b"}]", (b'{"a":' + DEEP + b"}\n", 1, None)),
    (b'{"data":[{}],"token":5}', (b"{}\n", 1, None)),
    (b'{"token":"","data":[{}]}', (b"{}\n", 1, "")),
    ('{"data":[{"x":"😀"}],"token":"é"}'.encode(), ('{"x":"😀"}\n'.encode(), 1, "é")),
    (b'[{"a":-0.5,"b":[true,false,null]}]', (b'{"a":-0.5,"b":[true,false,null]}\n', 1, None)),
]


@pytest.mark.parametrize("split", SPLITTERS)
@pytest.mark.parametrize("body", NONE)
def test_left_to_orjson(split, body):
    assert split(body) is None


@pytest.mark.parametrize("split", SPLITTERS)
@pytest.mark.parametrize(("body", "want"), SOME)
def test_taken(split, body, want):
    assert split(body) == want
    _agrees_with_orjson(body, want)


@pytest.mark.parametrize("split", SPLITTERS)
@example(b"[" + b",".join([b'{"i":%d}' % i for i in range(10000)]) + b"]")
@given(st.integers(1, 300).map(lambda k: b"[" + b",".join([b"{}"] * k) + b"]"))
def test_tightest_packing_fits_the_output_buffer(split, body):
    # "{}," is the densest payload: the chunk must still fit in the body's length + 1.
    chunk, count, _ = split(body)
    assert count == body.count(b"{") and chunk.count(b"\n") == count


@pytest.mark.parametrize("split", SPLITTERS)
@pytest.mark.parametrize("at", range(10))
def test_every_byte_of_a_string_is_checked_wherever_it_falls(split, at):
    # The compiled twin skips plain bytes four at a time: whatever is not plain must stop
    # the skip at any offset in the run, and a string cut off must not run past the body.
    def body(piece: bytes) -> bytes:
        return b'[{"a":"' + b"x" * at + piece + b"y" * (9 - at) + b'"}]'

    for bad in (b"\x00", b"\x1f", b"\x80", b"\xc3", b"\xff", b"\\x", b"\\u12"):
        assert split(body(bad)) is None, bad
    for good in (b"\x7f", b'\\"', b"\\\\", b"\\u00e9", "é".encode(), "😀".encode()):
        got = split(body(good))
        assert got is not None, good
        _agrees_with_orjson(body(good), got)
    assert split(b'[{"a":"' + b"x" * at) is None
