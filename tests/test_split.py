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


def _both(body: bytes, unique: bool = True) -> tuple[bytes, int, str | None] | None:
    py = _split_py.split_payloads(body, unique)
    if _split_c is not None:
        assert _split_c.split_payloads(body, unique) == py, body
        assert _split_c.members_unique(body) == _split_py.members_unique(body), body
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
    for unique in (True, False):
        got = _both(body, unique)
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


# --- member names (RFC 7493): a payload's names are checked unless they may repeat -----

MEMBERS = [b'"k%d":1' % i for i in range(_split_py.MAX_MEMBERS + 1)]
REPEATS = [  # (body, its chunk where names may repeat: the payloads as sent)
    (b'[{"a":1,"a":2}]', b'{"a":1,"a":2}\n'),
    (b'{"data":[{"a":{"b":1,"b":1}}]}', b'{"a":{"b":1,"b":1}}\n'),
    (b'[{"a":[{"x":1},{"x":1,"y":2,"x":3}]}]', b'{"a":[{"x":1},{"x":1,"y":2,"x":3}]}\n'),
    (b'{"a":1,"a":1}', b'{"a":1,"a":1}\n'),  # a lone object is the payload
    (b'[{"a":1,"\\u0061":2}]', b'{"a":1,"\\u0061":2}\n'),  # one name spelt two ways
    (b"[{" + b",".join(MEMBERS) + b"}]", b"{" + b",".join(MEMBERS) + b"}\n"),  # too many
]
COLLECTION_REPEATS = [
    b'{"version":1,"version":2,"data":[{}]}',
    b'{"data":[{}],"token":"a","token":"b"}',
    b'{"data":[{}],"extra":1,"extra":2}',
    b'{"data":[{}],' + b",".join(MEMBERS) + b"}",  # too many of its own to check
]


@pytest.mark.parametrize(("body", "chunk"), REPEATS)
def test_a_payload_that_repeats_a_name_is_left_to_the_check_unless_names_may_repeat(body, chunk):
    assert _both(body) is None
    assert _both(body, unique=False) == (chunk, 1, None)


@pytest.mark.parametrize("body", COLLECTION_REPEATS)
def test_a_collection_that_repeats_its_own_name_is_never_taken(body):
    assert _both(body) is None
    assert _both(body, unique=False) is None


def test_as_many_members_as_can_be_checked_are_taken():
    body = b"[{" + b",".join(MEMBERS[:-1]) + b"}]"
    assert _both(body) == (body[1:-1] + b"\n", 1, None)


@pytest.mark.parametrize(
    ("body", "unique"),
    [
        (b"", True),
        (b'{"a":1}\n{"a":2}\n', True),
        (b'{"a":{"b":1},"b":[{"b":1},{"b":2}]}', True),
        (b'{"a":1,"a":2}\n', False),
        (b'{"a":1}\n{"b":{"c":1,"c":2}}\n', False),
        (b'{"\\u0061":1}', False),  # not sure: the escape is decoded by the exact check
        (b'{"a":1e5}', False),  # left alone by the splitter: not sure either
    ],
)
def test_members_unique_is_sure_or_says_no(body, unique):
    _both(body)
    assert _split_py.members_unique(body) is unique


@given(PAYLOADS.filter(lambda ps: any(ps)), st.data())
def test_a_repeated_name_anywhere_in_a_payload_is_caught(payloads, data):
    i = data.draw(st.sampled_from([i for i, p in enumerate(payloads) if p]))
    name = data.draw(st.sampled_from(sorted(payloads[i])))
    texts = [json.dumps(p, separators=(",", ":"), ensure_ascii=False) for p in payloads]
    twice = json.dumps(name, ensure_ascii=False) + ":null"
    texts[i] = texts[i][:-1] + "," + twice + "}"
    body = ("[" + ",".join(texts) + "]").encode()
    assert _both(body) is None
    got = _both(body, unique=False)
    if got is not None:  # as sent, where the splitter takes the body at all
        assert got == ("".join(t + "\n" for t in texts).encode(), len(texts), None)


# --- field_values: the top-level members a partitioned batch needs, from one scan -------

FIELD_NAMES = st.lists(st.sampled_from(["a", "b", "é", "ts", ""]), min_size=1, max_size=3)


def _field_values(
    chunk: bytes, names: tuple[bytes, ...], unique: bool = False
) -> list[bytes | None] | None:
    py = _split_py.field_values(chunk, names, unique)
    if _split_c is not None:
        assert _split_c.field_values(chunk, names, unique) == py, chunk
    return py


@settings(max_examples=300)
@given(
    st.lists(st.dictionaries(st.sampled_from(["a", "b", "é", "ts", "", "z"]), VALUES), max_size=6),
    FIELD_NAMES,
    st.sampled_from([(",", ":"), (", ", ": "), (" , ", " : ")]),
)
def test_field_values_are_what_orjson_reads(payloads, names, separators):
    chunk = b"".join(
        json.dumps(p, separators=separators, ensure_ascii=False).encode() + b"\n" for p in payloads
    )
    wanted = tuple(n.encode() for n in names)
    got = _field_values(chunk, wanted)
    if got is not None:  # no payload repeats a name: reading up to the last one wanted agrees
        assert _field_values(chunk, wanted, unique=True) == got
    if got is None:  # the scanner declines what it cannot vouch for: exponents, say
        assert any(_split_py.split_payloads(line) is None for line in chunk.splitlines())
        return
    assert len(got) == len(payloads) * len(names)
    for row, payload in enumerate(payloads):
        for k, name in enumerate(names):
            text = got[row * len(names) + k]
            want = None if name not in payload else orjson.loads(json.dumps(payload[name]))
            assert (None if text is None else orjson.loads(text)) == want


def _field_groups(
    chunk: bytes, names: tuple[bytes, ...], unique: bool = False
) -> dict[tuple[bytes | None, ...], list[bytes]] | None:
    py = _split_py.field_groups(chunk, names, unique)
    if _split_c is not None:
        c = _split_c.field_groups(chunk, names, unique)
        assert c == py, chunk
        assert list(c or ()) == list(py or ()), chunk  # the groups in the same order
    return py


@settings(max_examples=300)
@given(
    st.lists(
        st.dictionaries(st.sampled_from(["a", "b", "é"]), st.sampled_from([1, "x", None])),
        max_size=8,
    ),
    FIELD_NAMES,
)
def test_field_groups_are_field_values_grouped(payloads, names):
    chunk = b"".join(json.dumps(p, ensure_ascii=False).encode() + b"\n" for p in payloads)
    wanted = tuple(n.encode() for n in names)
    values = _field_values(chunk, wanted)
    groups = _field_groups(chunk, wanted)
    assert values is not None and groups is not None
    want: dict[tuple[bytes | None, ...], list[bytes]] = {}
    for row, line in enumerate(chunk.splitlines(keepends=True)):
        want.setdefault(tuple(values[row * len(names) : (row + 1) * len(names)]), []).append(line)
    assert groups == want
    assert list(groups) == list(want)  # in the order of each group's first line
    assert _field_groups(chunk, wanted, unique=True) == groups


@pytest.mark.parametrize(
    "chunk, names, want",
    [
        (b'{"a":1,"b":1e5}\n', (b"a",), [b"1"]),  # the rest of the line is not read
        (b'{"b":1e5,"a":1}\n', (b"a",), None),
        (b'{"a":1,"b":2,"c":x\n', (b"b", b"a"), [b"2", b"1"]),
        (b'{"a":1,"a":2}\n', (b"a",), [b"1"]),  # what a line that repeats a name may not do
        (b'{"t":1,"x":2}\n', (b"t", b"t"), [b"1", b"1"]),
        (b'{"x":2}\n', (b"a",), [None]),
    ],
)
def test_field_values_of_lines_that_repeat_no_name(chunk, names, want):
    assert _field_values(chunk, names, unique=True) == want


@pytest.mark.parametrize(
    "chunk, want",
    [
        (b'{"a":1,"a":{"x":[2]}}\n', [b'{"x":[2]}']),  # given twice: the last, as orjson
        (b'{"b":1}\n{}\n', [None, None]),
        (b' {"a" : "x" } \n', [b'"x"']),
        (b'{"\\u0061":1}\n', None),  # a name spelt with an escape: only orjson matches it
        (b'{"a":1}', None),  # no newline
        (b'[{"a":1}]\n', None),
        (b'{"a":1}{"a":2}\n', None),
        (b'{"a":1e5}\n', None),  # the splitter leaves exponents to orjson
        (b'{"a":"\xff"}\n', None),  # not UTF-8
        (b"", []),
    ],
)
def test_field_values_cases(chunk, want):
    assert _field_values(chunk, (b"a",)) == want
    groups = _field_groups(chunk, (b"a",))
    if want is None:
        assert groups is None
    else:
        assert sum(map(len, groups.values())) == len(want)


@given(st.binary(max_size=40) | st.text('{}[]",:\\ 0123456789.-eEtrufalsnuab\n', max_size=40))
def test_field_values_of_arbitrary_bytes(raw):
    data = raw if isinstance(raw, bytes) else raw.encode()
    _field_values(data, (b"a", b"b"))  # the twins agree, and neither raises
    _field_groups(data, (b"a", b"b"))
    _field_values(data, (b"a", b"b"), unique=True)
    _field_groups(data, (b"b", b"b"), unique=True)


# --- shape: a batch measured as a table ------------------------------------------------


def _shape(batch: bytes, limit: int) -> tuple[int, int, int] | None:
    py = _split_py.shape(batch, limit)
    if _split_c is not None:
        assert _split_c.shape(batch, limit) == py, batch
    return py


def _paths(value: object, path: tuple, into: set) -> int:
    """What shape counts, from the parsed value: names under their parent, elements apart."""
    count = 1
    if isinstance(value, dict):
        for name, inner in value.items():
            into.add((*path, name))
            count += _paths(inner, (*path, name), into)
    elif isinstance(value, list) and value:
        into.add((*path, None))
        for inner in value:
            count += _paths(inner, (*path, None), into)
    return count


@settings(max_examples=300)
@given(st.lists(VALUES, max_size=6), st.sampled_from([(",", ":"), (", ", ": ")]))
def test_shape_counts_lines_paths_and_values(values, separators):
    texts = [json.dumps(v, separators=separators, ensure_ascii=False) for v in values]
    batch = "".join(t + "\n" for t in texts).encode()
    paths: set = set()
    count = sum(_paths(v, (), paths) for v in values)
    # json.dumps escapes control characters and quotes in names, which shape reads raw:
    # the same name spelt the same way each time, so the count is the same.
    assert _shape(batch, 10_000) == (len(values), len(paths), count)


@pytest.mark.parametrize(
    "batch, limit, want",
    [
        (b'{"a":1,"b":{"c":[1,2,{"d":null}]}}\n{"a":2}\n[1]\n', 100, (3, 6, 12)),
        (b'{"a.b":1}\n{"a":{"b":1}}\n', 100, (2, 3, 5)),  # a dotted name is not a path
        (b'{"a":[]}\n{"a":[1]}\n', 100, (2, 2, 5)),  # an empty array has no element path
        (b'{"s":"x\\"y\\\\","n":-1.5e+300}\n', 100, (1, 2, 3)),  # any escape, any number
        (b"".join(b'{"k%d":1}\n' % i for i in range(50)), 10, (10, 11, 20)),  # stops past 10
        (b'{"a":1}', 10, None),  # no newline
        (b'{"a":}\n', 10, None),
        (b'{"a":1} x\n', 10, None),
        (b"", 10, (0, 0, 0)),
    ],
)
def test_shape_cases(batch, limit, want):
    assert _shape(batch, limit) == want


@given(st.binary(max_size=40) | st.text('{}[]",:\\ 0123456789.-eEtrufalsnuab\n', max_size=40))
def test_shape_of_arbitrary_bytes(raw):
    data = raw if isinstance(raw, bytes) else raw.encode()
    _shape(data, 3)  # the twins agree, and neither raises
