"""Request bodies -> payloads: content types, decompression with a hard limit, validation.

A request is accepted whole or not at all. Its payloads leave here as one NDJSON
chunk (each payload on its own line, newline-terminated): the unit the intake
queue holds and the batcher appends.

Payloads are stored as sent, byte for byte: every NDJSON line, and each object of a
JSON body (the body itself, an array's elements, a collection's ``data``), found by
the splitter (``split.py``) without parsing the body into Python objects. Bodies the
splitter leaves alone (invalid ones, a payload spanning lines, an exponent or a
surrogate escape: see ``_split_py.py``) are parsed by orjson, which words the error
or re-serialises each payload compactly: same values, not necessarily the same
bytes. So a re-serialised payload may not hold an integer orjson cannot keep
(beyond 64 bits).

Member names must not repeat within an object (I-JSON, RFC 7493): readers disagree on
which of two values they keep. A collection that repeats one of its own names is
always refused; a payload that repeats one is refused unless ``--duplicate-keys
allow``, which stores it as sent. The splitter checks names in its one pass; a body it
is unsure of is checked here with the stdlib parser (several times orjson's time),
which also says where.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Any

import orjson

from fastingest.errors import Refusal
from fastingest.split import members_unique, split_payloads

# An integer of 19 or more digits may lie outside [-2**63, 2**64), which orjson reads as a float.
# Found by mapping every digit to "0" and searching for 19 of them: one C pass over the body
# (a regex \d{19,} restarts at every digit).
DIGITS_AS_ZERO = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x2E for byte in range(256))
LONG_DIGIT_RUN = b"0" * 19
ORJSON_MAX_DEPTH = 254  # containers orjson writes at most
JSON_TYPES = frozenset({"application/json"})
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl"})


class BodyError(Refusal):
    """A body refused: not decodable, not JSON, not payloads, or too large."""


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs 3x, per request
class Payloads:
    chunk: bytes  # NDJSON: every payload followed by b"\n"
    count: int
    token: str | None = None  # the collection's own "token" field


def _json_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", int: "number", float: "number"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


ZSTD_SLICE = 2048  # compressed bytes fed at a time: at most 64 MiB out (128 KiB RLE blocks)


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Decode Content-Encoding without ever producing more than `limit` + 1 bytes."""
    if not encoding:
        return body
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding in ("gzip", "x-gzip", "deflate"):
        wbits = 31 if "gzip" in encoding else 15
        out = bytearray()
        data = body
        try:
            while data:  # a gzip stream may hold several members
                d = zlib.decompressobj(wbits)
                out += d.decompress(data, limit + 1 - len(out))
                if len(out) > limit:
                    raise BodyError(413, "body_too_large", f"body inflates past {limit} bytes")
                if not d.eof:
                    raise BodyError(400, "bad_encoding", f"{encoding} stream is truncated")
                data = d.unused_data
        except zlib.error as exc:
            raise BodyError(400, "bad_encoding", f"body is not valid {encoding}: {exc}") from None
        return bytes(out)
    if encoding == "zstd":
        try:
            import zstandard
        except ImportError:
            raise BodyError(
                415, "unsupported_encoding", "zstd needs the 'zstandard' package on the server"
            ) from None
        out = bytearray()
        data = body
        try:
            while data:  # a zstd stream may hold several frames
                z = zstandard.ZstdDecompressor().decompressobj()
                # A small slice at a time: one input byte can stand for thousands out (RLE
                # blocks), so the limit is checked before much more than it is produced.
                for at in range(0, len(data), ZSTD_SLICE):
                    out += z.decompress(data[at : at + ZSTD_SLICE])
                    if len(out) > limit:
                        raise BodyError(413, "body_too_large", f"body inflates past {limit} bytes")
                    if z.eof:
                        break
                if not z.eof:
                    raise BodyError(400, "bad_encoding", "zstd stream is truncated")
                data = z.unused_data + data[at + ZSTD_SLICE :]
        except zstandard.ZstdError as exc:
            raise BodyError(400, "bad_encoding", f"body is not valid zstd: {exc}") from None
        return bytes(out)
    raise BodyError(
        415, "unsupported_encoding", f"Content-Encoding {encoding!r}: use gzip, deflate or zstd"
    )


def parse(body: bytes, content_type: str, unique: bool = True) -> Payloads:
    """Split a decoded body into payloads, or raise BodyError.

    With `unique`, a payload that repeats a member name is refused too.
    """
    if content_type in JSON_TYPES and (split := split_payloads(body, unique)) is not None:
        return Payloads(*split)
    if not body.strip():
        raise BodyError(400, "empty_body", "the request has no body")
    if content_type in JSON_TYPES:
        return _parse_json(body, unique)
    if content_type in NDJSON_TYPES:
        return _parse_ndjson(body, unique)
    raise BodyError(
        415,
        "unsupported_media_type",
        f"Content-Type {content_type or '(none)'!r}: use application/json or application/x-ndjson",
    )


def _decode_error(exc: orjson.JSONDecodeError, line: int | None = None) -> BodyError:
    where = {"line": line or exc.lineno, "column": exc.colno}
    if line is None:
        where["position"] = exc.pos
    return BodyError(
        400, "malformed_json", f"{exc.msg} at line {where['line']} column {exc.colno}", **where
    )


def _parse_json(body: bytes, unique: bool) -> Payloads:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _decode_error(exc) from None
    collection = type(doc) is dict and "data" in doc
    # orjson kept the last of any repeated name: look again where the splitter's scan
    # cannot vouch for the whole body (it can for a payload that only spans lines).
    if (unique or collection) and not members_unique(body):
        _refuse_repeated_names(body, nested=unique)
    if type(doc) is dict:
        if "data" in doc:  # the original design's collection
            data = doc["data"]
            if type(data) is not list:
                raise BodyError(
                    422,
                    "invalid_collection",
                    f"'data' must be an array of payload objects, not {_json_type(data)}",
                )
            token = doc.get("token")
            return Payloads(*_join(data, "data", body), token if isinstance(token, str) else None)
        raw = body.strip()
        if b"\n" in raw or b"\r" in raw:  # NDJSON needs one line per payload
            _check_integers(body)
            raw = _dumps(doc)
        return Payloads(raw + b"\n", 1)
    if type(doc) is list:
        return Payloads(*_join(doc, "array", body))
    raise BodyError(
        422, "invalid_payload", f"a payload must be a JSON object, not {_json_type(doc)}"
    )


def _int64(text: str) -> int:
    if len(text) <= 20:  # longer is out of range (and int() refuses 4,300+ digits)
        value = int(text)
        if -(2**63) <= value < 2**64:
            return value
    raise BodyError(
        400,
        "integer_out_of_range",
        f"integer {text[:40]} is beyond 64 bits: this payload is re-serialised (it is "
        "in an array or a collection, or spans several lines) and the integer would come "
        "out as a float; send it as a string, or the payload on one line or as NDJSON",
    )


def _check_integers(body: bytes) -> None:
    """Refuse an integer orjson would have turned into a float; only long digit runs pay."""
    if LONG_DIGIT_RUN in body.translate(DIGITS_AS_ZERO):
        json.loads(body, parse_int=_int64)  # exact integers; the body is already valid JSON


def _dumps(payload: Any) -> bytes:
    """A payload re-serialised, or BodyError if it nests deeper than orjson writes."""
    try:
        return orjson.dumps(payload)
    except orjson.JSONEncodeError:
        raise _too_deep() from None


def _too_deep() -> BodyError:
    return BodyError(
        400,
        "too_deep",
        "a payload nests too deeply to be re-serialised or checked (orjson writes at most "
        f"{ORJSON_MAX_DEPTH} containers deep)",
    )


def _join(items: list[Any], field: str, body: bytes) -> tuple[bytes, int]:
    if not items:
        raise BodyError(422, "no_payloads", f"{field} holds no payloads")
    _check_integers(body)
    parts = []
    for i, item in enumerate(items):
        if type(item) is not dict:
            raise BodyError(
                422,
                "invalid_payload",
                f"{field}[{i}] is {_json_type(item)}, not an object",
                index=i,
            )
        parts.append(_dumps(item))
    parts.append(b"")
    return b"\n".join(parts), len(items)


class _Members(list[tuple[str, Any]]):
    """An object as the stdlib parser read it: every member, repeated names included."""


def _repeated(value: Any, path: str, nested: bool) -> tuple[str, str] | None:
    """(the path of the first object that repeats a name, the name), depth first."""
    if isinstance(value, _Members):
        names: set[str] = set()
        for name, _ in value:
            if name in names:
                return path, name
            names.add(name)
        if nested:
            for name, member in value:
                step = f".{name}" if name.isidentifier() else f"[{json.dumps(name)}]"
                if found := _repeated(member, path + step, nested):
                    return found
    elif nested and isinstance(value, list):
        for i, item in enumerate(value):
            if found := _repeated(item, f"{path}[{i}]", nested):
                return found
    return None


def _refuse_repeated_names(text: bytes, nested: bool, line: int | None = None) -> None:
    """BodyError if an object in `text` (valid JSON) repeats a member name; without
    `nested`, only the top-level object's names are checked."""
    try:
        found = _repeated(json.loads(text, object_pairs_hook=_Members), "$", nested)
    except RecursionError:
        raise _too_deep() from None
    if found is None:
        return
    path, name = found
    where = {"path": path} if line is None else {"path": path, "line": line}
    at = path if line is None else f"{path} on line {line}"
    raise BodyError(
        400,
        "duplicate_key",
        f"member name {name!r} repeats in {at}: names must be unique (RFC 7493)",
        **where,
    )


def _parse_ndjson(body: bytes, unique: bool) -> Payloads:
    lines: list[bytes] = []
    loads = orjson.loads
    for number, line in enumerate(body.split(b"\n"), 1):
        line = line.strip()
        if not line:
            continue
        try:
            doc = loads(line)
        except orjson.JSONDecodeError as exc:
            raise _decode_error(exc, number) from None
        if type(doc) is not dict:
            raise BodyError(
                422,
                "invalid_payload",
                f"line {number} is {_json_type(doc)}, not an object",
                index=len(lines),
                line=number,
            )
        lines.append(line)
    if unique and not members_unique(body):  # the splitter is unsure: find the line
        for number, line in enumerate(body.split(b"\n"), 1):
            if line.strip():
                _refuse_repeated_names(line, True, number)
    lines.append(b"")
    return Payloads(b"\n".join(lines), len(lines) - 1)
