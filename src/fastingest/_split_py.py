"""Split a JSON body into payloads without building it: the pure-Python twin of ``_split.pyx``.

This module is the specification. The compiled twin has the same functions, and it
must return the same thing for every input; tests/test_split.py checks the two
against each other and against orjson. This one is several times slower than the
orjson path in ``bodies.py``, so it is used only where the extension is not built.

``split_payloads(body)`` returns ``(chunk, count, token)``: each payload's own bytes,
as sent, each followed by ``b"\\n"``, their count, and the collection's ``token``.
Or it returns None, and the body goes to the orjson path, which parses it,
re-serialises each payload and words any error. So None answers everything that is
not plainly fine:

- invalid JSON, judged at least as strictly as orjson: UTF-8 without overlongs or
  surrogates, no control characters in strings, no leading zeros, no trailing
  commas, nothing after the document;
- valid JSON that orjson might read differently: a ``\\u`` escape of a surrogate, a
  number with an exponent or longer than ``MAX_NUMBER`` characters (orjson refuses
  some as infinite), nesting deeper than ``MAX_DEPTH``;
- a top-level key written with an escape, a top-level key given twice (orjson keeps the
  last), more than ``MAX_MEMBERS`` top-level keys, a ``token`` string with an escape;
- with ``unique`` (member names must not repeat, RFC 7493), a payload's object that
  repeats a member name, writes one with an escape (the same name may be spelt two
  ways) or has more than ``MAX_MEMBERS`` members;
- any shape but these three: a collection whose ``data`` is a non-empty array of
  objects, a non-empty array of objects, one object without ``data``;
- a payload that spans lines (NDJSON needs one line per payload).

``field_values(chunk, names)`` reads an NDJSON chunk the splitter made and hands out
the JSON text of some top-level members of each payload, for partitioning: one scan
instead of orjson building every payload. ``field_groups(chunk, names)`` scans the same
way and groups the lines by that text: a chunk's lines with the same values, together.

``shape(batch, limit)`` measures an NDJSON batch as a table: its lines, its distinct
field paths (a member's name under its parent's path; an array's elements under one
path of their own), stopping past `limit`, and its values. The Parquet writer reads
from these whether the batch is dense enough to become columns without a blow-up.
"""

from __future__ import annotations

import re

MAX_DEPTH = 128  # containers inside containers (orjson allows 1024)
MAX_NUMBER = 100  # characters in a number; a longer one may be infinite as a double
MAX_MEMBERS = 64  # in an object whose names are checked (the compiled twin: on its stack)

_WHITESPACE = frozenset(b" \t\n\r")
_STRING = re.compile(rb'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"')
_ESCAPE = re.compile(rb"\\(?:u[dD][89a-fA-F]|.)")  # escapes in order; 3 bytes: a surrogate
_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?")
_NOT_AFTER_NUMBER = frozenset(b"0123456789eE.")  # an exponent, or an invalid number
_LITERALS = (b"true", b"false", b"null")
QUOTE, COMMA, COLON = ord('"'), ord(","), ord(":")
OBJECT, OBJECT_END, ARRAY, ARRAY_END = ord("{"), ord("}"), ord("["), ord("]")
NO_TOKEN = (-1, -1)  # the token's span, quotes excluded, when there is none


def split_payloads(body: bytes, unique: bool = True) -> tuple[bytes, int, str | None] | None:
    """The body's payloads as an NDJSON chunk, their count and the collection's token.

    With `unique`, each payload's member names are checked not to repeat (a collection's
    own names always are).
    """
    n = len(body)
    i = _ws(body, 0)
    spans: list[tuple[int, int]] = []
    token = NO_TOKEN
    if i == n:
        return None
    if body[i] == ARRAY:
        end = _payloads(body, i, 1, spans, unique)
    elif body[i] == OBJECT:
        end, token = _collection(body, i, spans, unique)
        if end >= 0 and not spans:  # no "data": the object is the payload
            spans.append((i, end))
    else:
        return None
    if end < 0 or _ws(body, end) != n:
        return None
    for a, b in spans:
        if b"\n" in body[a:b] or b"\r" in body[a:b]:
            return None
    chunk = b"".join(body[a:b] + b"\n" for a, b in spans)
    text = None if token == NO_TOKEN else body[token[0] : token[1]].decode()
    return chunk, len(spans), text


def members_unique(body: bytes) -> bool:
    """Whether `body`, JSON values one after another (NDJSON), is sure to repeat no member
    name in any object; False also where the splitter would leave the body alone."""
    n = len(body)
    i = _ws(body, 0)
    while i < n:
        i = _value(body, i, 0, True)
        if i < 0:
            return False
        i = _ws(body, i)
    return True


def field_values(
    chunk: bytes, names: tuple[bytes, ...], unique: bool = False
) -> list[bytes | None] | None:
    """The JSON text of the top-level members `names` of each line's object, line after
    line: ``[line 0's names..., line 1's names..., ...]``, None for a name a line lacks
    (for a name given twice, the last, as orjson reads it).

    None for the whole chunk where a line is not one object the scanner reads whole, or
    writes a top-level name with an escape: a name only orjson would match.

    With `unique` (no line repeats a member name, however spelt: the splitter's check),
    a line is read only until each of `names` is found, so neither a later member nor
    the line's end is looked at; a line that lacks one is read whole.
    """
    rows = _rows(chunk, names, unique)
    return None if rows is None else [value for _, values in rows for value in values]


def field_groups(
    chunk: bytes, names: tuple[bytes, ...], unique: bool = False
) -> dict[tuple[bytes | None, ...], list[bytes]] | None:
    """The lines of `chunk`, each with its newline, grouped by the JSON text of their
    top-level members `names` (as field_values reads it): groups in the order of their
    first line, lines in order. None where field_values is None.
    """
    rows = _rows(chunk, names, unique)
    if rows is None:
        return None
    groups: dict[tuple[bytes | None, ...], list[bytes]] = {}
    for line, values in rows:
        groups.setdefault(tuple(values), []).append(line)
    return groups


def _rows(
    chunk: bytes, names: tuple[bytes, ...], unique: bool
) -> list[tuple[bytes, list[bytes | None]]] | None:
    """Each line of `chunk` (with its newline) and its values of `names`; None as above."""
    rows = []
    start = 0
    while start < len(chunk):
        stop = chunk.find(b"\n", start)
        if stop < 0:
            return None
        values = _members(chunk[start:stop], names, unique)
        if values is None:
            return None
        rows.append((chunk[start : stop + 1], values))
        start = stop + 1
    return rows


def _members(line: bytes, names: tuple[bytes, ...], unique: bool) -> list[bytes | None] | None:
    n = len(line)
    values: list[bytes | None] = [None] * len(names)
    left = len(set(names))  # names not found yet
    i = _ws(line, 0)
    if i >= n or line[i] != OBJECT:
        return None
    i = _ws(line, i + 1)
    if i < n and line[i] == OBJECT_END:
        return values if _ws(line, i + 1) == n else None
    while True:
        if i >= n or line[i] != QUOTE:
            return None
        end = _string(line, i)
        if end < 0 or b"\\" in line[i:end]:
            return None
        name = line[i + 1 : end - 1]
        i = _ws(line, end)
        if i >= n or line[i] != COLON:
            return None
        start = _ws(line, i + 1)
        i = _value(line, start, 1, False)
        if i < 0:
            return None
        if name in names:
            for k, wanted in enumerate(names):
                if name == wanted:
                    values[k] = line[start:i]
            left -= 1
            if unique and not left:
                return values
        i = _ws(line, i)
        if i < n and line[i] == COMMA:
            i = _ws(line, i + 1)
        elif i < n and line[i] == OBJECT_END:
            return values if _ws(line, i + 1) == n else None
        else:
            return None


def _collection(
    body: bytes, i: int, spans: list[tuple[int, int]], unique: bool
) -> tuple[int, tuple[int, int]]:
    """A top-level object at body[i]; fills `spans` from its "data". -1 for None.

    A repeated name is None for a collection; for a lone object (the payload) only with
    `unique`.
    """
    n = len(body)
    token = NO_TOKEN
    names: set[bytes] = set()
    repeated = False
    i = _ws(body, i + 1)
    if i < n and body[i] == OBJECT_END:
        return i + 1, token
    while True:
        if i >= n or body[i] != QUOTE:
            return -1, token
        end = _string(body, i)
        if end < 0:
            return -1, token
        key = body[i + 1 : end - 1]
        if b"\\" in key or len(names) == MAX_MEMBERS:
            return -1, token
        repeated = repeated or key in names
        names.add(key)
        i = _ws(body, end)
        if i >= n or body[i] != COLON:
            return -1, token
        i = _ws(body, i + 1)
        if key == b"data":
            if spans or i >= n or body[i] != ARRAY:
                return -1, token
            i = _payloads(body, i, 2, spans, unique)
        elif key == b"token":
            if i < n and body[i] == QUOTE:
                end = _string(body, i)
                if end < 0 or b"\\" in body[i:end]:
                    return -1, token
                token = (i + 1, end - 1)
                i = end
            else:
                i = _value(body, i, 1, unique)
        else:
            i = _value(body, i, 1, unique)
        if i < 0:
            return -1, token
        i = _ws(body, i)
        if i < n and body[i] == COMMA:
            i = _ws(body, i + 1)
        elif i < n and body[i] == OBJECT_END:
            if repeated and (spans or unique):
                return -1, token
            return i + 1, token if spans else NO_TOKEN  # a lone object has no token
        else:
            return -1, token


def _payloads(body: bytes, i: int, depth: int, spans: list[tuple[int, int]], unique: bool) -> int:
    """A non-empty array of objects at body[i], `depth` containers deep; their spans."""
    n = len(body)
    i = _ws(body, i + 1)
    while True:
        if i >= n or body[i] != OBJECT:
            return -1
        end = _value(body, i, depth, unique)
        if end < 0:
            return -1
        spans.append((i, end))
        i = _ws(body, end)
        if i < n and body[i] == COMMA:
            i = _ws(body, i + 1)
        elif i < n and body[i] == ARRAY_END:
            return i + 1
        else:
            return -1


def _value(body: bytes, i: int, depth: int, unique: bool) -> int:
    """The end of the value at body[i], which `depth` containers hold; -1 for None."""
    if i >= len(body):
        return -1
    c = body[i]
    if c == QUOTE:
        return _string(body, i)
    if c == OBJECT or c == ARRAY:
        if depth >= MAX_DEPTH:
            return -1
        if c == OBJECT:
            return _object(body, i, depth + 1, unique)
        return _array(body, i, depth + 1, unique)
    return _word(body, i) or _number(body, i)


def _word(body: bytes, i: int) -> int:
    """The end of the true, false or null at body[i]; 0 if none is there (a number, or
    nothing valid, is left to the caller)."""
    for word in _LITERALS:
        if body.startswith(word, i):
            return i + len(word)
    return 0


def _object(body: bytes, i: int, depth: int, unique: bool) -> int:
    n = len(body)
    names: set[bytes] = set()
    i = _ws(body, i + 1)
    if i < n and body[i] == OBJECT_END:
        return i + 1
    while True:
        if i >= n or body[i] != QUOTE:
            return -1
        end = _string(body, i)
        if end < 0:
            return -1
        if unique:
            name = body[i + 1 : end - 1]
            if b"\\" in name or name in names or len(names) == MAX_MEMBERS:
                return -1
            names.add(name)
        i = _ws(body, end)
        if i >= n or body[i] != COLON:
            return -1
        i = _value(body, _ws(body, i + 1), depth, unique)
        if i < 0:
            return -1
        i = _ws(body, i)
        if i < n and body[i] == COMMA:
            i = _ws(body, i + 1)
        elif i < n and body[i] == OBJECT_END:
            return i + 1
        else:
            return -1


def _array(body: bytes, i: int, depth: int, unique: bool) -> int:
    n = len(body)
    i = _ws(body, i + 1)
    if i < n and body[i] == ARRAY_END:
        return i + 1
    while True:
        i = _value(body, i, depth, unique)
        if i < 0:
            return -1
        i = _ws(body, i)
        if i < n and body[i] == COMMA:
            i = _ws(body, i + 1)
        elif i < n and body[i] == ARRAY_END:
            return i + 1
        else:
            return -1


def _string(body: bytes, i: int) -> int:
    """The end of the string at body[i] (past its closing quote); -1 for None."""
    m = _STRING.match(body, i)
    if m is None:
        return -1
    text = body[i : m.end()]
    if b"\\" in text and any(len(e.group()) > 2 for e in _ESCAPE.finditer(text)):
        return -1  # a surrogate escape
    if not text.isascii():
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            return -1
    return m.end()


def _number(body: bytes, i: int) -> int:
    m = _NUMBER.match(body, i)
    if m is None:
        return -1
    end = m.end()
    if end - i > MAX_NUMBER or (end < len(body) and body[end] in _NOT_AFTER_NUMBER):
        return -1
    return end


def _ws(body: bytes, i: int) -> int:
    n = len(body)
    while i < n and body[i] in _WHITESPACE:
        i += 1
    return i


# --- shape: a batch measured as a table ------------------------------------------------

_ANY_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_ANY_NUMBER = re.compile(rb"[-+0-9.eE]+")
ELEMENTS = b"\x01"  # an array's elements, in a path: no member name holds a control byte

_Paths = set[tuple[bytes, ...]]
_Counted = tuple[int, int] | None  # (end, values), end -1 where it is not JSON; None: too many


def shape(batch: bytes, limit: int) -> tuple[int, int, int] | None:
    """(lines, distinct field paths, values) of an NDJSON batch; paths stop at limit + 1.

    The batch was checked when it was taken, so the scan is lenient (any escape, any
    number); None where a line still is not one JSON value.
    """
    paths: _Paths = set()
    rows = values = 0
    start = 0
    n = len(batch)
    while start < n:
        stop = batch.find(b"\n", start)
        if stop < 0:
            return None
        line = batch[start:stop]
        counted = _shape(line, _ws(line, 0), (), 0, paths, limit)
        if counted is None:
            return rows, limit + 1, values  # past the limit: nothing more to learn
        end, found = counted
        if end < 0 or _ws(line, end) != len(line):
            return None
        rows += 1
        values += found
        start = stop + 1
    return rows, len(paths), values


def _shape(
    line: bytes, i: int, path: tuple[bytes, ...], depth: int, paths: _Paths, limit: int
) -> _Counted:
    """The value at line[i], its field paths added to `paths` (under `path`)."""
    if i >= len(line):
        return -1, 0
    c = line[i]
    if c == QUOTE:
        m = _ANY_STRING.match(line, i)
        return (m.end() if m else -1), 1
    if c == OBJECT or c == ARRAY:
        if depth >= MAX_DEPTH:
            return -1, 0
        return _shape_container(line, i, path, depth + 1, paths, limit)
    if end := _word(line, i):
        return end, 1
    m = _ANY_NUMBER.match(line, i)
    return (m.end() if m else -1), 1


def _shape_container(
    line: bytes, i: int, path: tuple[bytes, ...], depth: int, paths: _Paths, limit: int
) -> _Counted:
    """An object's members each have a path under `path`; an array's elements share one."""
    is_object = line[i] == OBJECT
    close = OBJECT_END if is_object else ARRAY_END
    values = 1
    i = _ws(line, i + 1)
    if i < len(line) and line[i] == close:
        return i + 1, values
    inner = path
    if not is_object:
        inner = (*path, ELEMENTS)
        paths.add(inner)
        if len(paths) > limit:
            return None
    while True:
        if is_object:
            m = _ANY_STRING.match(line, i) if i < len(line) and line[i] == QUOTE else None
            if m is None:
                return -1, 0
            inner = (*path, line[i + 1 : m.end() - 1])
            paths.add(inner)
            if len(paths) > limit:
                return None
            i = _ws(line, m.end())
            if i >= len(line) or line[i] != COLON:
                return -1, 0
            i = _ws(line, i + 1)
        counted = _shape(line, i, inner, depth, paths, limit)
        if counted is None or counted[0] < 0:
            return counted
        i = _ws(line, counted[0])
        values += counted[1]
        if i < len(line) and line[i] == COMMA:
            i = _ws(line, i + 1)
        elif i < len(line) and line[i] == close:
            return i + 1, values
        else:
            return -1, 0
