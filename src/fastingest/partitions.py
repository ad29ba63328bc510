"""Payload fields -> key segments: ``--partition-by`` and ``--time-field``.

A payload's partition is the Hive-style path its object lands under, before the
object's name: ``country=DE/app=web/`` for ``--partition-by country,app``, then
``dt=YYYY-MM-DD/hour=HH/`` of its event time with ``--time-field`` (else of the
batch's arrival time, as without partitions).

- A value is the field's string, a number or boolean as JSON writes it, an object or
  array as compact JSON; missing, null or "" is ``__HIVE_DEFAULT_PARTITION__``
  (which Hive, Spark, DuckDB and pyarrow read as NULL).
- Everything but ``A-Z a-z 0-9 _ . - ~`` is percent-encoded (UTF-8), as Hive
  does, so any string is one safe key segment and Hive-partition readers decode
  it back. A value longer than ``MAX_VALUE_CHARS`` once encoded is cut and ends
  with ``~`` and a hash of the whole value: distinct values stay apart, but such a
  value does not read back whole.
- An event time is epoch seconds or milliseconds (a number; milliseconds from
  ``MILLIS_FROM`` on) or an RFC 3339 string. A payload whose field is missing or
  unreadable lands under its arrival hour instead, and is counted.

Top-level fields are read from the chunk by the splitter's scan, without parsing whole
payloads: without an event time the scan groups a chunk's lines by their fields' text
(``field_groups``), so a partition's key is made once per group, not per line; with
one, each line's values (``field_values``). A dotted path, or a chunk the scan
declines, is parsed by orjson, which reads the same values. A chunk is always split
the same way from its bytes and its arrival time, which the spool keeps, so a replay
finds each batch's payloads again (see replay.py).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import orjson

from fastingest.split import field_groups, field_values

DEFAULT_PARTITION = "__HIVE_DEFAULT_PARTITION__"
MAX_VALUE_CHARS = 128
MILLIS_FROM = 1e11  # as seconds that is the year 5138; as milliseconds, 1973
LATEST = 253402300799.0  # 9999-12-31T23:59:59Z
FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*")
_HOURS_KEPT = 4096  # formatted event hours cached; cleared when full
_VALUES_KEPT = 4096  # a field's encoded string values cached; cleared when full
SCANNED_FIELDS = 16  # names field_values looks for at most (_split.pyx's MAX_FIELDS)


def parse_fields(text: str) -> tuple[str, ...]:
    """``--partition-by``'s comma-separated dotted paths; ValueError on a bad one."""
    fields = tuple(f.strip() for f in text.split(",") if f.strip())
    for f in fields:
        if not FIELD.fullmatch(f):
            raise ValueError(f"{f!r} is not a field path (names joined by dots)")
    if len(set(fields)) < len(fields):
        raise ValueError(f"a field is named twice in {text!r}")
    return fields


def hour_segments(ts: float) -> str:
    """``dt=YYYY-MM-DD/hour=HH/`` of epoch seconds `ts` (UTC)."""
    return time.strftime("dt=%Y-%m-%d/hour=%H/", time.gmtime(ts))


def encode_value(value: Any) -> str:
    """A field value as one Hive partition value, percent-encoded."""
    if value is None or value == "":
        return DEFAULT_PARTITION
    if isinstance(value, str):
        text = value
    else:  # numbers, booleans, objects, arrays: as JSON writes them
        text = orjson.dumps(value).decode()
    encoded = quote(text, safe="")
    if len(encoded) <= MAX_VALUE_CHARS:
        return encoded
    kept, room = [], MAX_VALUE_CHARS - 17
    for char in text:  # whole characters, so the cut value still decodes
        piece = quote(char, safe="")
        room -= len(piece)
        if room < 0:
            break
        kept.append(piece)
    return f"{''.join(kept)}~{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def event_time(value: Any) -> float | None:
    """Epoch seconds of an event time field's value, or None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        ts = value / 1000 if abs(value) >= MILLIS_FROM else float(value)
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        ts = parsed.timestamp()
    else:
        return None
    return ts if 0 <= ts <= LATEST else None


class Partitioner:
    """Splits NDJSON chunks into their payloads' partitions."""

    def __init__(
        self, fields: Sequence[str], time_field: str | None = None, unique: bool = False
    ) -> None:
        self.fields = tuple(fields)
        self.time_field = time_field
        # The chunks repeat no member name (the run refused them): a line is scanned only
        # until each field wanted is found. Kept in the spec: a replay scans the same way.
        self.unique = unique
        # (segment name, path, its string values' segments seen lately)
        self._paths = [(f.replace(".", "_"), f.split("."), dict[str, str]()) for f in fields]
        self._time_path = time_field.split(".") if time_field else None
        self._hours: dict[int, str] = {}
        # Top-level fields only: the scanner hands out their JSON text, so a payload is
        # not parsed whole; the segments are cached by that text.
        wanted = [*fields, *([time_field] if time_field else [])]
        simple = len(wanted) <= SCANNED_FIELDS and not any("." in f for f in wanted)
        self._names = tuple(f.encode() for f in wanted) if simple else None
        self._by_text = [(name, dict[bytes | None, str]()) for name, _, _ in self._paths]
        self._keys: dict[tuple[bytes | None, ...], str] = {}  # fields' texts -> partition

    @property
    def spec(self) -> str:
        """What decides a payload's partition, as text (kept with the spool, per run)."""
        spec = {"fields": self.fields, "time_field": self.time_field, "unique": self.unique}
        return orjson.dumps(spec).decode()

    @classmethod
    def from_spec(cls, spec: str) -> Partitioner:
        loaded = orjson.loads(spec)
        return cls(loaded["fields"], loaded["time_field"], loaded.get("unique", False))

    @property
    def by_event_time(self) -> bool:
        return self._time_path is not None

    def split(self, chunk: bytes, received: float) -> tuple[dict[str, list[bytes]], int]:
        """({partition: its lines, in order, each with its newline}, payloads that fell
        back to the arrival time for want of an event time)."""
        names = self._names
        if names is not None and self._time_path is None:
            groups = field_groups(chunk, names, self.unique)
            if groups is None:
                return self._split_parsed(chunk, received)
            joined = self._join_groups(groups)
            if joined is not None:
                return joined, 0
        values = field_values(chunk, names, self.unique) if names is not None else None
        if values is not None:
            return self._split_values(chunk, values, received)
        return self._split_parsed(chunk, received)

    def _split_parsed(self, chunk: bytes, received: float) -> tuple[dict[str, list[bytes]], int]:
        """split(), each payload parsed whole by orjson."""
        parts: dict[str, list[bytes]] = {}
        fallbacks = 0
        loads, find, partition = _loads, chunk.find, self.partition
        start = 0
        while end := find(b"\n", start) + 1:
            line = chunk[start:end]
            start = end
            key, fell_back = partition(loads(line), received)
            fallbacks += fell_back
            parts.setdefault(key, []).append(line)
        return parts, fallbacks

    def _join_groups(
        self, groups: dict[tuple[bytes | None, ...], list[bytes]]
    ) -> dict[str, list[bytes]] | None:
        """split() without an event time, from the scan's groups of lines with the same
        fields' text (`field_groups`): work per group, not per line. None where two groups
        are one partition (a value spelt two ways, "a" and "\\u0061"): their lines
        interleave, and only a walk line by line keeps them in order."""
        parts: dict[str, list[bytes]] = {}
        keys = self._keys
        for texts, lines in groups.items():
            key = keys.get(texts)
            if key is None:
                if len(keys) >= _VALUES_KEPT:
                    keys.clear()
                key = keys[texts] = "".join(
                    known.get(text) or self._segment(k, text)
                    for k, ((_, known), text) in enumerate(zip(self._by_text, texts, strict=True))
                )
            if key in parts:
                return None
            parts[key] = lines
        return parts

    def _segment(self, k: int, text: bytes | None) -> str:
        """Field k's key segment for its value's JSON text, kept for the next time."""
        name, known = self._by_text[k]
        if len(known) >= _VALUES_KEPT:
            known.clear()
        segment = known[text] = f"{name}={encode_value(None if text is None else _loads(text))}/"
        return segment

    def _split_values(
        self, chunk: bytes, values: list[bytes | None], received: float
    ) -> tuple[dict[str, list[bytes]], int]:
        """split(), from the JSON text of each payload's fields (`field_values`)."""
        parts: dict[str, list[bytes]] = {}
        fallbacks = 0
        fields = self._by_text
        timed = self._time_path is not None
        width = len(fields) + timed
        find = chunk.find
        start = at = 0
        while end := find(b"\n", start) + 1:
            line = chunk[start:end]
            start = end
            key = ""
            for k, (_, known) in enumerate(fields):
                text = values[at + k]
                key += known.get(text) or self._segment(k, text)
            if timed:
                ts = _event_time_of(values[at + width - 1])
                if ts is None:
                    ts = received
                    fallbacks += 1
                key += self._hour(ts)
            at += width
            parts.setdefault(key, []).append(line)
        return parts, fallbacks

    def select(self, chunk: bytes, received: float, partition: str) -> list[bytes]:
        """The lines of `chunk` in `partition`."""
        return self.split(chunk, received)[0].get(partition, [])

    def partition(self, payload: Any, received: float) -> tuple[str, bool]:
        """(`payload`'s partition, whether its event time fell back to `received`)."""
        segments = []
        for name, path, known in self._paths:
            value = _get(payload, path)
            if type(value) is str:  # the usual case: a few values, seen again and again
                segment = known.get(value)
                if segment is None:
                    if len(known) >= _VALUES_KEPT:
                        known.clear()
                    segment = known[value] = f"{name}={encode_value(value)}/"
            else:
                segment = f"{name}={encode_value(value)}/"
            segments.append(segment)
        fell_back = False
        if self._time_path is not None:
            ts = event_time(_get(payload, self._time_path))
            if ts is None:
                ts, fell_back = received, True
            segments.append(self._hour(ts))
        return "".join(segments), fell_back

    def _hour(self, ts: float) -> str:
        hour = int(ts // 3600)
        text = self._hours.get(hour)
        if text is None:
            if len(self._hours) >= _HOURS_KEPT:
                self._hours.clear()
            text = self._hours[hour] = hour_segments(hour * 3600)
        return text


def _loads(text: bytes) -> Any:
    """A payload or a value as orjson reads it (an integer past 64 bits as a double).

    The splitter lets nothing through that orjson refuses; were it to, the payload
    lands in the default partition rather than stopping the batcher.
    """
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return None


def _event_time_of(text: bytes | None) -> float | None:
    """event_time() of a field's JSON text; epoch numbers without parsing JSON."""
    if text is None:
        return None
    if text.isdigit() and len(text) <= 16:  # epoch s or ms: int() reads it as orjson would
        number = int(text)
        ts = number / 1000 if number >= MILLIS_FROM else float(number)
        return ts if ts <= LATEST else None
    return event_time(_loads(text))


def _get(payload: Any, path: list[str]) -> Any:
    for name in path:
        if not isinstance(payload, dict):
            return None
        payload = payload.get(name)
    return payload
