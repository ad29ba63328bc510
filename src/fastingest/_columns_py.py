"""An NDJSON batch read into Arrow column buffers: the pure-Python twin of
``_columns.pyx``, and its specification.

``read`` gives what pyarrow's JSON reader (``read_json``, types inferred) would make
of the batch, as buffers, or None where it might differ, and pyarrow's reader reads
the batch instead. None where:

- a line is not an object, or not JSON;
- a field's values change type (pyarrow refuses the batch), but for integers and
  doubles in one column, which are all doubles, as pyarrow makes them;
- an integer is past int64, a number past a double's range, a string holds an
  escaped surrogate not in a pair, or an object names a member twice;
- a string starts as a date does (``YYYY-``): pyarrow may make its column a timestamp;
- containers nest deeper than ``MAX_DEPTH``;
- the batch has more than `max_fields` field paths, or more slots than
  `cells_per_value` per value plus `free_cells` (a batch of ever new fields would
  cost rows x fields).

Its input is payloads the splitter accepted: it refuses what it does not expect, but
does not check every rule of JSON's grammar on the way.

A column is ``(name, kind, length, nulls, validity, values, offsets, children)``:
kind is one of NULL, BOOL, INT, DOUBLE, STRING, STRUCT, LIST (0-6); validity an Arrow
bitmap, or None without nulls; values the int64s, doubles, bool bitmap or UTF-8 text;
offsets the int32 offsets of a string or list column; children a struct's fields in
order of first sight, or a list's element column. The buffers are memoryviews (the
compiled twin's own memory, handed to Arrow without a copy). Field paths and values are counted
as ``split.shape`` counts them.
"""

from __future__ import annotations

import json
import struct
from typing import Any

NULL, BOOL, INT, DOUBLE, STRING, STRUCT, LIST = range(7)
MAX_DEPTH = 128
_MAX_OFFSET = (1 << 31) - 1
_INT64 = (-(1 << 63), (1 << 63) - 1)

Column = tuple[str, int, int, int, "memoryview | None", memoryview, memoryview, tuple[Any, ...]]


class _Unread(Exception):
    """The batch is left to pyarrow's reader."""


class _Object(list[tuple[str, Any]]):
    """An object's members in order (a dict would hide a repeated name)."""


class _Node:
    __slots__ = ("children", "counted", "kind", "name", "offsets", "valid", "values")

    def __init__(self, name: str) -> None:
        self.name = name
        self.kind = NULL
        self.valid: list[bool] = []
        self.values: list[Any] = []  # per slot; a string's text, encoded
        self.offsets: list[int] = []
        self.children: list[_Node] = []
        self.counted = False

    @property
    def length(self) -> int:
        return len(self.valid)


class _Reader:
    def __init__(self, max_fields: int, cells_per_value: int, free_cells: int) -> None:
        self.max_fields = max_fields
        self.cells_per_value = cells_per_value
        self.free_cells = free_cells
        self.fields = self.values = self.cells = 0

    def crowded(self) -> bool:
        return self.cells > self.cells_per_value * self.values + self.free_cells

    def null(self, node: _Node) -> None:
        self.cells += 1
        node.valid.append(False)
        if node.kind in (BOOL, INT, DOUBLE):
            node.values.append(False if node.kind == BOOL else 0)
        elif node.kind == STRING:
            node.values.append(b"")
            node.offsets.append(node.offsets[-1])
        elif node.kind == LIST:
            node.offsets.append(node.children[0].length)
        elif node.kind == STRUCT:
            for child in node.children:
                self.null(child)

    def become(self, node: _Node, kind: int) -> None:
        if node.kind == kind:
            return
        if node.kind == INT and kind == DOUBLE:
            node.values = [float(v) for v in node.values]
        elif node.kind != NULL:
            raise _Unread  # the column changed type
        elif kind in (BOOL, INT, DOUBLE):
            node.values = [False if kind == BOOL else 0] * node.length
        elif kind in (STRING, LIST):
            node.offsets = [0] * (node.length + 1)
            node.values = [b""] * node.length if kind == STRING else []
            if kind == LIST:
                node.children.append(_Node(""))
        node.kind = kind

    def valid(self, node: _Node) -> None:
        self.cells += 1
        self.values += 1
        node.valid.append(True)

    def value(self, value: Any, node: _Node, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise _Unread
        if value is None:
            self.values += 1
            self.null(node)
        elif isinstance(value, bool):
            self.become(node, BOOL)
            node.values.append(value)
            self.valid(node)
        elif isinstance(value, int):
            self.become(node, DOUBLE if node.kind == DOUBLE else INT)
            node.values.append(float(value) if node.kind == DOUBLE else value)
            self.valid(node)
        elif isinstance(value, float):
            self.become(node, DOUBLE)
            node.values.append(value)
            self.valid(node)
        elif isinstance(value, str):
            self.become(node, STRING)
            head = value[:4]
            if value[4:5] == "-" and len(head) == 4 and head.isascii() and head.isdigit():
                raise _Unread  # maybe a timestamp
            try:
                text = value.encode()
            except UnicodeEncodeError:
                raise _Unread from None  # a lone surrogate
            node.values.append(text)
            node.offsets.append(node.offsets[-1] + len(text))
            if node.offsets[-1] > _MAX_OFFSET:
                raise _Unread
            self.valid(node)
        elif isinstance(value, _Object):
            self.become(node, STRUCT)
            self.members(value, node, depth)
            self.valid(node)
        else:
            self.become(node, LIST)
            element = node.children[0]
            if value and not node.counted:
                node.counted = True
                self.fields += 1
                if self.fields > self.max_fields:
                    raise _Unread
            for item in value:
                self.value(item, element, depth + 1)
            node.offsets.append(element.length)
            if node.offsets[-1] > _MAX_OFFSET:
                raise _Unread
            self.valid(node)

    def members(self, members: _Object, node: _Node, depth: int) -> None:
        row = node.length
        for name, inner in members:
            child = next((c for c in node.children if c.name == name), None)
            if child is None:  # a new field: null in every slot before this one
                self.fields += 1
                if self.fields > self.max_fields:
                    raise _Unread
                child = _Node(name)
                node.children.append(child)
                for _ in range(row):
                    self.null(child)
                if self.crowded():
                    raise _Unread
            elif child.length > row:
                raise _Unread  # named twice
            self.value(inner, child, depth + 1)
        for child in node.children:  # the fields it lacks are null
            if child.length == row:
                self.null(child)
        if self.crowded():
            raise _Unread


def _refuse(text: str) -> Any:
    raise _Unread


def _int(text: str) -> int:
    value = int(text)
    if not _INT64[0] <= value <= _INT64[1]:
        raise _Unread
    return value


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _Unread
    return value


def _bitmap(bits: list[bool]) -> memoryview:
    out = bytearray((len(bits) + 7) // 8)
    for k, bit in enumerate(bits):
        if bit:
            out[k >> 3] |= 1 << (k & 7)
    return memoryview(bytes(out))


def _values(node: _Node) -> memoryview:
    if node.kind == BOOL:
        return _bitmap(node.values)
    packed = b""
    if node.kind == INT:
        packed = struct.pack(f"<{node.length}q", *node.values)
    elif node.kind == DOUBLE:
        packed = struct.pack(f"<{node.length}d", *node.values)
    elif node.kind == STRING:
        packed = b"".join(node.values)
    return memoryview(packed)


def _out(node: _Node) -> Column:
    offsets = struct.pack(f"<{len(node.offsets)}i", *node.offsets) if node.offsets else b""
    nulls = node.valid.count(False)
    return (
        node.name,
        node.kind,
        node.length,
        nulls,
        _bitmap(node.valid) if nulls else None,
        _values(node),
        memoryview(offsets),
        tuple(_out(c) for c in node.children),
    )


def read(
    batch: bytes, max_fields: int, cells_per_value: int, free_cells: int
) -> tuple[tuple[int, int, int], tuple[Column, ...]] | None:
    """((rows, field paths, values), the columns), or None: see the module's docstring."""
    reader = _Reader(max_fields, cells_per_value, free_cells)
    root = _Node("")
    root.kind = STRUCT
    lines = batch.split(b"\n")
    if lines.pop() != b"" or not lines:
        return None  # the last line is cut, or there is none
    try:
        for line in lines:
            value = json.loads(
                line,
                object_pairs_hook=_Object,
                parse_int=_int,
                parse_float=_float,
                parse_constant=_refuse,
            )
            if not isinstance(value, _Object):
                return None  # a row is an object
            reader.members(value, root, 0)
            reader.valid(root)
    except (_Unread, ValueError, RecursionError):
        return None
    return (root.length, reader.fields, reader.values), tuple(_out(c) for c in root.children)
