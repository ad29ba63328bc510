"""Payload chunks -> objects: batch thresholds, NDJSON framing, compression, key naming.

The batcher appends whole request chunks (already NDJSON, see ``bodies``) to the
open ``Batch``; a batch closes on its byte, payload-count or age threshold and
becomes an ``Upload`` job, sealed: compressed, hashed, ready to PUT.

A batch is compressed as it grows (``Encoder``), a batcher round's chunks at a time,
on the event loop: the same CPU as compressing the whole batch at the end, spread thin,
where a compression thread on a busy core would hold it for whole scheduler ticks while
every request in flight waited.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from zlib_ng import zlib_ng

if TYPE_CHECKING:
    from fastingest.spool import Spool

log = logging.getLogger("fastingest.batching")

EXTENSIONS = {"gzip": ".ndjson.gz", "zstd": ".ndjson.zst", "none": ".ndjson"}


CONTENT_TYPES = {
    "gzip": "application/gzip",
    "zstd": "application/zstd",
    "none": "application/x-ndjson",
}
GZIP_LEVEL = 6
# The ingest tier is CPU-bound: zstd -1 compresses JSON several times faster than gzip -6
# (even zlib-ng's), into objects no larger.
ZSTD_LEVEL = 1


class Encoder:
    """One object's body, built a piece at a time: compressed, with its two hashes.

    Both hashes are of the body as stored, so ``sha256sum`` checks a downloaded
    object as it is, and they hash 2-10x fewer bytes than the NDJSON (SHA-256 of
    the NDJSON was a tenth of a request's CPU at 10 payloads). The NDJSON itself is
    checked by whoever decompresses it: gzip members end with its CRC32, and the
    zstd frame is written with its XXH64 checksum.

    zstd and gzip compress as a stream, so a zstd object is one frame without its
    content size in the header: read it with a streaming decoder (``zstd -d``,
    ``ZstdDecompressor().stream_reader``), as analytics engines do.
    """

    __slots__ = ("_compress", "_flush", "_md5", "_out", "_sha256")

    def __init__(self, compression: str) -> None:
        if compression == "zstd":
            import zstandard

            # With the frame's XXH64 of the NDJSON, which every decoder checks.
            c: Any = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).compressobj()
        elif compression == "gzip":
            # A gzip member (gunzip reads it), by zlib-ng: 2.2x zlib's speed at this level.
            c = zlib_ng.compressobj(GZIP_LEVEL, zlib_ng.DEFLATED, 31)
        elif compression == "none":
            c = None
        else:
            raise ValueError(f"unknown compression {compression!r}")
        self._compress: Callable[[bytes], bytes] = bytes if c is None else c.compress
        self._flush: Callable[[], bytes] = bytes if c is None else c.flush
        self._sha256 = hashlib.sha256()
        self._md5 = hashlib.md5()
        self._out: list[bytes] = []

    def feed(self, raw: bytes) -> None:
        self._keep(self._compress(raw))

    def finish(self) -> tuple[bytes, str, str]:
        """(body, hex SHA-256 of the body, base64 MD5 of the body for Content-MD5)."""
        self._keep(self._flush())
        body = b"".join(self._out)
        self._out = []
        return body, self._sha256.hexdigest(), base64.b64encode(self._md5.digest()).decode()

    def _keep(self, out: bytes) -> None:
        if out:  # a stream compressor holds its input until it has a block's worth
            self._sha256.update(out)
            self._md5.update(out)
            self._out.append(out)


class KeyMaker:
    """Object keys that are unique, and the same again when a spool is replayed.

    ``<prefix>dt=YYYY-MM-DD/hour=HH/<host>-<spool>-e<epoch>-<first>-<last>.ndjson.gz``
    for a batch of chunks first..last, and
    ``<prefix>dt=YYYY-MM-DD/<host>-<spool>-e<epoch>-<seq>-<line>.json`` per payload.
    ``spool`` is the spool directory's id and ``epoch`` counts its starts, so keys
    never repeat across hosts, processes or restarts, yet a crashed process's
    objects get the very same keys when its spool is replayed.
    """

    def __init__(self, prefix: str, spool_id: str, epoch: int, host: str | None = None) -> None:
        host = re.sub(r"[^A-Za-z0-9.-]", "_", host or socket.gethostname())[:63]
        self.prefix = prefix
        self.base = f"{host}-{spool_id}"
        self.epoch = epoch

    def batch(self, opened: float, first: int, last: int, extension: str) -> str:
        t = time.gmtime(opened)
        day, hour = time.strftime("%Y-%m-%d", t), time.strftime("%H", t)
        return (
            f"{self.prefix}dt={day}/hour={hour}/"
            f"{self.base}-e{self.epoch}-{first:012d}-{last:012d}{extension}"
        )

    def payload(self, received: float, seq: int, line: int, epoch: int | None = None) -> str:
        day = time.strftime("%Y-%m-%d", time.gmtime(received))
        epoch = self.epoch if epoch is None else epoch
        return f"{self.prefix}dt={day}/{self.base}-e{epoch}-{seq:012d}-{line:05d}.json"


@dataclass(slots=True)
class Upload:
    """One object to store: built by the batcher, sealed and uploaded by a worker."""

    key: str
    parts: list[bytes]  # NDJSON chunks to seal(), or the one payload; empty once sealed
    raw_size: int  # their bytes, uncompressed (known, not summed: a batch has ~10k parts)
    payloads: int
    first: float  # receive time of the first and last payload (epoch seconds)
    last: float
    content_type: str
    seqs: range = range(0)  # the request chunks this object holds (all or part of)
    marker: int | None = None  # first seq of a batch whose marker is in the spool
    compression: str = "none"
    excluded: frozenset[int] = frozenset()  # seqs in `seqs` whose chunks it leaves out
    part: int = -1  # per-payload mode: the payload's line within its chunk
    body: bytes = b""  # compressed: by the batcher as the batch grew, or by seal()
    sha256: str = ""  # of the body as stored, for downstream completeness checks
    content_md5: str = ""  # of the stored body, sent as Content-MD5

    @classmethod
    def batch(
        cls,
        key: str,
        seqs: range,
        compression: str,
        *,
        opened: float,
        last: float,
        raw_size: int,
        payloads: int,
        excluded: frozenset[int] = frozenset(),
        sealed: tuple[bytes, str, str] = (b"", "", ""),
    ) -> Upload:
        """A batch of chunks `seqs` (its marker in the spool at the first): sealed, as the
        batcher closes it, or to be read back from the spool and sealed by a worker."""
        body, sha256, content_md5 = sealed
        return cls(
            key,
            [],
            raw_size,
            payloads,
            opened,
            last,
            CONTENT_TYPES[compression],
            seqs,
            seqs.start,
            compression,
            excluded,
            body=body,
            sha256=sha256,
            content_md5=content_md5,
        )

    def seal(self) -> None:
        """Join and compress what the batcher left unsealed (a replayed batch, a payload)."""
        if self.body:
            return
        encoder = Encoder(self.compression)
        encoder.feed(b"".join(self.parts))
        self.body, self.sha256, self.content_md5 = encoder.finish()
        self.parts = []  # only the body is needed from here: free the chunks

    def on_disk(self, spool: Spool) -> bool:
        """Whether the spool holds every chunk of this object, so its bytes may be dropped."""
        return self.marker is not None or spool.written(self.seqs.stop - 1)

    def unload(self) -> None:
        """Drop the bytes (kept in the spool); reload() brings them back before a PUT."""
        self.parts = []
        self.body = b""
        self.sha256 = self.content_md5 = ""

    async def reload(self, spool: Spool) -> None:
        """Read this object's chunks back from the spool, to seal() again."""
        found = await spool.read(self.seqs.start, self.seqs.stop)
        wanted = [s for s in self.seqs if s not in self.excluded]
        missing = [s for s in wanted if s not in found]
        if missing:  # the ledger kept them: only damage on disk can get here
            log.error("%s: %d chunks are missing from the spool", self.key, len(missing))
        chunks = [found[s][0] for s in wanted if s in found]
        if self.part >= 0:  # one payload of its chunk
            chunks = [chunks[0].split(b"\n")[self.part]] if chunks else []
        self.parts = chunks
        self.raw_size = sum(len(c) for c in chunks)
        if self.part < 0:
            self.payloads = sum(c.count(b"\n") for c in chunks)
            if times := [found[s][1] for s in wanted if s in found]:
                self.last = max(times)

    def metadata(self) -> dict[str, str]:
        """What a downstream job needs to check an object is complete."""
        return {
            "fastingest-payloads": str(self.payloads),
            "fastingest-sha256": self.sha256,
            "fastingest-first": _iso(self.first),
            "fastingest-last": _iso(self.last),
        }


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


@dataclass(slots=True)
class Batch:
    """The open batch: chunks first..last appended until a threshold closes it.

    Chunks wait in ``pending`` until ``encode()`` feeds them to the encoder: the
    batcher calls it once per round, so the compressor gets a few KB per call
    rather than one request's bytes.
    """

    opened: float
    first: int
    max_bytes: int
    max_payloads: int
    compression: str
    encoder: Encoder = field(init=False)
    pending: list[bytes] = field(default_factory=list)
    chunks: int = 0
    skipped: list[int] = field(default_factory=list)  # seqs in its range it leaves out
    nbytes: int = 0
    payloads: int = 0
    last: float = 0.0

    def __post_init__(self) -> None:
        self.encoder = Encoder(self.compression)

    def add(self, chunk: bytes, payloads: int, now: float) -> None:
        """Append a chunk of `payloads` lines (counted when it was accepted)."""
        self.pending.append(chunk)
        self.chunks += 1
        self.nbytes += len(chunk)
        self.payloads += payloads
        self.last = now

    def skip(self, seq: int) -> None:
        """Chunk `seq`, next in line, is not part of this batch (its spool write was refused)."""
        self.skipped.append(seq)

    def encode(self) -> None:
        if self.pending:
            self.encoder.feed(b"".join(self.pending))
            self.pending = []

    @property
    def full(self) -> bool:
        return self.nbytes >= self.max_bytes or self.payloads >= self.max_payloads

    def close(self, keys: KeyMaker) -> Upload:
        self.encode()
        seqs = range(self.first, self.first + self.chunks + len(self.skipped))
        return Upload.batch(
            keys.batch(self.opened, seqs.start, seqs.stop - 1, EXTENSIONS[self.compression]),
            seqs,
            self.compression,
            opened=self.opened,
            last=self.last,
            raw_size=self.nbytes,
            payloads=self.payloads,
            excluded=frozenset(self.skipped),
            sealed=self.encoder.finish(),
        )


def per_payload(
    chunk: bytes, seq: int, keys: KeyMaker, now: float, epoch: int | None = None
) -> list[Upload]:
    """One object per payload, as in the original design."""
    return [
        Upload(
            keys.payload(now, seq, i, epoch),
            [line],
            len(line),
            1,
            now,
            now,
            "application/json",
            range(seq, seq + 1),
            part=i,
        )
        for i, line in enumerate(chunk.split(b"\n")[:-1])
    ]
