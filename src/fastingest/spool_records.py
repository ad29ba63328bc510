"""The spool's files: segment header, record framing, batch markers, reading them back.

A segment file is ``<8s magic><u32 epoch>`` followed by records:
``<u32 body length><u32 crc32 of the rest><u8 kind><u64 seq><f64 time><body>``.
``DATA`` records hold one request's NDJSON chunk under its sequence number.
``BATCH`` records hold a closed batch (see ``Marker``): ``seq`` is its first chunk,
``time`` when it opened, the body everything else replay needs to rebuild the same
object under the same key.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from zlib_ng.zlib_ng import crc32  # zlib's CRC-32 with SIMD, several times zlib's speed

log = logging.getLogger("fastingest.spool")

MAGIC = b"FISPOOL3"
SEGMENT_HEADER = struct.Struct("<8sI")  # magic, epoch
_LENGTH_CRC = struct.Struct("<II")  # body length, crc32 of what follows
_META = struct.Struct("<BQd")  # kind, seq, time
RECORD = struct.Struct(_LENGTH_CRC.format + _META.format[1:])  # a record's head, as read
CRC_FROM = _LENGTH_CRC.size  # the crc covers kind, seq, time and body
_MARKER_HEAD = struct.Struct("<QBBH")  # last seq; lengths of compression, format, partition
EXCLUDED_AT = b"\x00"  # in a marker's body: the left-out seqs follow (keys never hold NUL)
DATA, BATCH = 1, 2
MAX_RECORD = 1 << 30


@dataclass(slots=True)
class Record:
    kind: int
    seq: int
    time: float
    body: bytes
    epoch: int  # of the process that wrote it
    offset: int = 0  # in its segment file

    @property
    def batch(self) -> Marker:
        """For BATCH records: the batch it describes."""
        return Marker.unpack(self.seq, self.time, self.body)


@dataclass(slots=True, frozen=True)
class Marker:
    """A closed batch as its BATCH record holds it: the `partition`'s payloads of chunks
    first..last but `excluded`, stored under `key` in `format` with `compression`."""

    first: int
    last: int
    key: str
    compression: str
    opened: float
    excluded: frozenset[int] = frozenset()
    format: str = "ndjson"
    partition: str = ""  # its key segments (partitions.py); "" when not partitioned

    def pack(self) -> bytes:
        names = [self.compression.encode(), self.format.encode(), self.partition.encode()]
        body = _MARKER_HEAD.pack(self.last, *map(len, names)) + b"".join(names) + self.key.encode()
        if self.excluded:
            body += EXCLUDED_AT + struct.pack(f"<{len(self.excluded)}Q", *sorted(self.excluded))
        return body

    @classmethod
    def unpack(cls, first: int, opened: float, body: bytes) -> Marker:
        last, *lengths = _MARKER_HEAD.unpack_from(body)
        at = _MARKER_HEAD.size
        names = []
        for length in lengths:
            names.append(body[at : at + length].decode())
            at += length
        compression, fmt, partition = names
        key, _, rest = body[at:].partition(EXCLUDED_AT)
        excluded = frozenset(struct.unpack(f"<{len(rest) // 8}Q", rest)) if rest else frozenset()
        return cls(first, last, key.decode(), compression, opened, excluded, fmt, partition)

    @property
    def seqs(self) -> list[int]:
        """The chunks the batch holds, ascending."""
        return [s for s in range(self.first, self.last + 1) if s not in self.excluded]


def head(kind: int, seq: int, ts: float, body: bytes) -> bytes:
    """A record's bytes before its body (the spool writes the two without joining them)."""
    meta = _META.pack(kind, seq, ts)
    return _LENGTH_CRC.pack(len(body), crc32(body, crc32(meta))) + meta


def read_segment(path: Path, quarantine: Path) -> tuple[int, list[Record], int, bool]:
    """(epoch, records, good size, damaged). A damaged tail is moved to `quarantine`."""
    data = path.read_bytes()
    if len(data) < SEGMENT_HEADER.size or data[:8] != MAGIC:
        reason = "bad segment header"
        if data[:7] == MAGIC[:7]:
            reason = f"a segment in another format ({data[:8].decode(errors='replace')})"
        _quarantine(path, data, 0, quarantine, reason)
        return 0, [], 0, True
    _, epoch = SEGMENT_HEADER.unpack_from(data)
    records: list[Record] = []
    pos = SEGMENT_HEADER.size
    while pos < len(data):
        if pos + RECORD.size > len(data):
            reason = "torn record header"
            break
        length, crc, kind, seq, ts = RECORD.unpack_from(data, pos)
        end = pos + RECORD.size + length
        if length > MAX_RECORD or end > len(data):
            reason = "torn record (length past the end)"
            break
        if crc32(data[pos + CRC_FROM : end]) != crc or kind not in (DATA, BATCH):
            reason = "checksum mismatch"
            break
        records.append(Record(kind, seq, ts, data[pos + RECORD.size : end], epoch, pos))
        pos = end
    else:
        return epoch, records, pos, False
    _quarantine(path, data, pos, quarantine, reason)
    return epoch, records, pos, True


def read_chunks(
    plan: list[tuple[Path, int, int]], start: int, stop: int
) -> dict[int, tuple[bytes, float]]:
    """Data records with seq in [start, stop) from (path, offset, end) spans: seq -> (body, time).

    Runs in a thread. The spans come from the ledger, so every record read was written
    whole and checked at start or by its own write.
    """
    found: dict[int, tuple[bytes, float]] = {}
    for path, offset, end in plan:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            pos = offset
            end = min(end, len(m))
            while pos + RECORD.size <= end:
                length, _, kind, seq, ts = RECORD.unpack_from(m, pos)
                body_at = pos + RECORD.size
                pos = body_at + length
                if kind != DATA:
                    continue
                if seq >= stop:
                    break
                if seq >= start:
                    found[seq] = (m[body_at:pos], ts)
    return found


def _quarantine(path: Path, data: bytes, pos: int, quarantine: Path, reason: str) -> None:
    quarantine.mkdir(parents=True, exist_ok=True)
    target = quarantine / f"{path.name}.{pos}.bad"
    target.write_bytes(data[pos:])
    with open(path, "r+b") as f:
        f.truncate(pos)
        os.fsync(f.fileno())
    log.error(
        "spool %s: %s at byte %d; %d damaged bytes moved to %s, starting anyway",
        path.name,
        reason,
        pos,
        len(data) - pos,
        target,
    )
