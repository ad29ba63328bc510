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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zstandard
from zlib_ng import zlib_ng

from fastingest.parquet import REJECTS_PREFIX, reject_line
from fastingest.partitions import hour_segments

if TYPE_CHECKING:
    from fastingest.parquet import ParquetWriter
    from fastingest.partitions import Partitioner
    from fastingest.spool import Spool

log = logging.getLogger("fastingest.batching")

EXTENSIONS = {"gzip": ".ndjson.gz", "zstd": ".ndjson.zst", "none": ".ndjson"}
PARQUET_EXTENSION = ".parquet"  # its pages are compressed, never the file

CONTENT_TYPES = {
    "gzip": "application/gzip",
    "zstd": "application/zstd",
    "none": "application/x-ndjson",
}
PARQUET_TYPE = "application/vnd.apache.parquet"
GZIP_LEVEL = 6
# The ingest tier is CPU-bound: zstd -1 compresses JSON several times faster than gzip -6
# (even zlib-ng's), into objects no larger.
ZSTD_LEVEL = 1
# A waiting partition's batch keeps its NDJSON packed: zstd's fast mode, about 0.9 µs a
# payload both ways, where reading it back splits every chunk its range spans again.
PACK_LEVEL = -1


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


def extension(fmt: str, compression: str) -> str:
    return PARQUET_EXTENSION if fmt == "parquet" else EXTENSIONS[compression]


def ndjson_compression(compression: str) -> str:
    """The compression of NDJSON written beside Parquet objects (the rejects): snappy is
    a page compression only."""
    return compression if compression in EXTENSIONS else "zstd"


class KeyMaker:
    """Object keys that are unique, and the same again when a spool is replayed.

    ``<prefix>[<partition>]dt=YYYY-MM-DD/hour=HH/<host>-<spool>-e<epoch>-<first>-<last>.ndjson.gz``
    for a batch of chunks first..last (``.parquet`` with ``--format parquet``; the
    partition's segments carry the hour when it is the event time's), and
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

    def batch(
        self,
        opened: float,
        first: int,
        last: int,
        extension: str,
        partition: str = "",
        *,
        hours: bool = True,
    ) -> str:
        """`hours`: the arrival hour's segments follow the partition's (else it has its own)."""
        where = partition + hour_segments(opened) if hours else partition
        return f"{self.prefix}{where}{self.base}-e{self.epoch}-{first:012d}-{last:012d}{extension}"

    def rejects(self, key: str, compression: str) -> str:
        """Where the payloads of object `key` that do not fit its format go, as NDJSON."""
        rest = key.removeprefix(self.prefix).removesuffix(PARQUET_EXTENSION)
        return f"{self.prefix}{REJECTS_PREFIX}{rest}{EXTENSIONS[compression]}"

    def payload(self, received: float, seq: int, line: int, epoch: int | None = None) -> str:
        day = time.strftime("%Y-%m-%d", time.gmtime(received))
        epoch = self.epoch if epoch is None else epoch
        return f"{self.prefix}dt={day}/{self.base}-e{epoch}-{seq:012d}-{line:05d}.json"


@dataclass(slots=True)
class Upload:
    """One object to store: built by the batcher, sealed and uploaded by a worker.

    A Parquet batch may also hold the payloads that do not fit the format: sealing it
    makes them a second object, ``rejects``, stored first, under ``REJECTS_PREFIX``.
    """

    key: str
    parts: list[bytes]  # NDJSON chunks (or a partition's lines) to seal(); empty once sealed
    raw_size: int  # their bytes, uncompressed (known, not summed: a batch has ~10k parts)
    payloads: int  # all it accounts for, the rejects' included
    first: float  # receive time of the first and last payload (epoch seconds)
    last: float
    content_type: str
    seqs: range = range(0)  # the request chunks this object holds (all or part of)
    marker: int | None = None  # first seq of a batch whose marker is in the spool
    compression: str = "none"
    excluded: frozenset[int] = frozenset()  # seqs in `seqs` whose chunks it leaves out
    part: int = -1  # per-payload mode: the payload's line within its chunk
    body: bytes = b""  # compressed: by the batcher as the batch grew, or by seal()
    sha256: str = ""  # of the body as stored, for downstream completeness checks; "" unsealed
    content_md5: str = ""  # of the stored body, sent as Content-MD5
    writer: ParquetWriter | None = None  # converts it to Parquet when it is sealed
    rejects_key: str = ""  # where a Parquet batch's misfits go
    rejects: Upload | None = None  # set by seal(): the payloads the format did not take
    partition: str = ""  # a partition's batch: only its payloads of the chunks it holds
    partitioner: Partitioner | None = None  # finds them again when read back from the spool
    holds: tuple[int, ...] | None = None  # a partition's batch: the chunks it has lines of
    landed: set[str] = field(default_factory=set)  # keys stored already (rejects, then it)
    packed: bytes = b""  # its parts, compressed while it waits for a seal thread (pack())

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
        parts: list[bytes] | None = None,
        writer: ParquetWriter | None = None,
        keys: KeyMaker | None = None,
        partition: str = "",
        partitioner: Partitioner | None = None,
        holds: tuple[int, ...] | None = None,
    ) -> Upload:
        """A batch of chunks `seqs` (its marker in the spool at the first): sealed, as the
        batcher closes an NDJSON batch; or `parts` to seal, or to be read back from the
        spool and sealed by a worker. A Parquet batch (`writer`) needs the `keys` that
        name where its misfits go."""
        body, sha256, content_md5 = sealed
        rejects_key = ""
        if writer is not None:
            assert keys is not None
            rejects_key = keys.rejects(key, ndjson_compression(compression))
        return cls(
            key,
            parts or [],
            raw_size,
            payloads,
            opened,
            last,
            CONTENT_TYPES[compression] if writer is None else PARQUET_TYPE,
            seqs,
            seqs.start,
            compression,
            excluded,
            body=body,
            sha256=sha256,
            content_md5=content_md5,
            writer=writer,
            rejects_key=rejects_key,
            partition=partition,
            partitioner=partitioner,
            holds=holds,
        )

    @property
    def format(self) -> str:
        return "ndjson" if self.writer is None else "parquet"

    @property
    def chunks(self) -> Iterable[int]:
        """The seqs of the chunks it has payloads of (excluded ones aside)."""
        return self.seqs if self.holds is None else self.holds

    def seal(self) -> None:
        """Join and compress (or convert) what the batcher left unsealed: a replayed batch,
        a partition's batch, a Parquet batch, a payload."""
        if self.sha256:
            return
        if self.packed:
            self.parts = [zstandard.ZstdDecompressor().decompress(self.packed)]
            self.packed = b""
        if self.writer is None:
            encoder = Encoder(self.compression)
            encoder.feed(b"".join(self.parts))
            self.body, self.sha256, self.content_md5 = encoder.finish()
        else:
            self._convert(self.writer)
        self.parts = []  # only the body is needed from here: free the chunks

    def _convert(self, writer: ParquetWriter) -> None:
        self.body, _, misfits = writer.convert(b"".join(self.parts))
        self.sha256 = hashlib.sha256(self.body).hexdigest()
        self.content_md5 = base64.b64encode(hashlib.md5(self.body).digest()).decode()
        self.rejects = None
        if misfits:
            compression = ndjson_compression(self.compression)
            rejects = Upload(
                self.rejects_key,
                [reject_line(line, why) for line, why in misfits],
                0,
                len(misfits),
                self.first,
                self.last,
                CONTENT_TYPES[compression],
                self.seqs,
                compression=compression,
            )
            rejects.seal()
            self.rejects = rejects

    def objects(self) -> list[Upload]:
        """What storing it writes, once sealed: the rejects first, then itself (a Parquet
        batch of which no payload fit is its rejects alone)."""
        main = [self] if self.writer is None or self.payloads > self.rejected else []
        return [self.rejects, *main] if self.rejects is not None else main

    @property
    def rejected(self) -> int:
        return 0 if self.rejects is None else self.rejects.payloads

    def on_disk(self, spool: Spool) -> bool:
        """Whether the spool holds every chunk of this object, so its bytes may be dropped."""
        return self.marker is not None or spool.written(self.seqs.stop - 1)

    def pack(self) -> None:
        """Keep the parts compressed until seal(): for a partition's batch waiting for a
        seal thread, whose reload() would split every chunk its range spans again."""
        self.packed = zstandard.ZstdCompressor(level=PACK_LEVEL).compress(b"".join(self.parts))
        self.parts = []

    def unload(self) -> None:
        """Drop the bytes (kept in the spool); reload() brings them back before a PUT."""
        self.parts = []
        self.packed = b""
        self.body = b""
        self.sha256 = self.content_md5 = ""
        self.rejects = None

    async def reload(self, spool: Spool) -> None:
        """Read this object's chunks back from the spool, to seal() again."""
        found = await spool.read(self.seqs.start, self.seqs.stop)
        wanted = [s for s in self.chunks if s not in self.excluded]
        missing = [s for s in wanted if s not in found]
        if missing:  # the ledger kept them: only damage on disk can get here
            log.error("%s: %d chunks are missing from the spool", self.key, len(missing))
        present = [s for s in wanted if s in found]
        chunks = [found[s][0] for s in present]
        if self.part >= 0:  # one payload of its chunk
            chunks = [chunks[0].split(b"\n")[self.part]] if chunks else []
        elif self.partitioner is not None:  # its partition's lines of each chunk
            chunks = [
                line
                for s in present
                for line in self.partitioner.select(found[s][0], found[s][1], self.partition)
            ]
        self.parts = chunks
        self.raw_size = sum(map(len, chunks))
        if self.part < 0:
            if missing or self.excluded:  # fewer payloads than it was made with
                self.payloads = sum(c.count(b"\n") for c in chunks)
            if times := [found[s][1] for s in present]:
                self.last = max(times)

    def metadata(self) -> dict[str, str]:
        """What a downstream job needs to check an object is complete."""
        return {
            "fastingest-payloads": str(self.payloads - self.rejected),
            "fastingest-sha256": self.sha256,
            "fastingest-first": _iso(self.first),
            "fastingest-last": _iso(self.last),
        }


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


@dataclass(slots=True)
class Batch:
    """An open batch: chunks first..last appended until a threshold closes it.

    An NDJSON batch of whole chunks is compressed as it grows: chunks wait in
    ``pending`` until ``encode()`` feeds them to the encoder, which the batcher calls
    once per round, so the compressor gets a few KB per call rather than one
    request's bytes. A partition's batch (lines of many chunks, ``holds`` naming
    them) and a Parquet batch keep their NDJSON for a seal thread.
    """

    opened: float
    first: int
    max_bytes: int
    max_payloads: int
    compression: str
    writer: ParquetWriter | None = None
    partition: str = ""
    partitioner: Partitioner | None = None
    encoder: Encoder | None = field(init=False)
    pending: list[bytes] = field(default_factory=list)
    chunks: int = 0
    skipped: list[int] = field(default_factory=list)  # seqs in its range it leaves out
    holds: list[int] = field(default_factory=list)  # a partition's batch: chunks it has lines of
    nbytes: int = 0
    payloads: int = 0
    last: float = 0.0
    waiters: int = 0  # chunks in it whose clients wait for "uploaded"
    closes_at: float = 0.0  # monotonic time its age closes it

    def __post_init__(self) -> None:
        streams = self.writer is None and self.partitioner is None
        self.encoder = Encoder(self.compression) if streams else None

    def add(self, chunk: bytes, payloads: int, now: float) -> None:
        """Append a chunk of `payloads` lines (counted when it was accepted)."""
        self.pending.append(chunk)
        self.chunks += 1
        self.nbytes += len(chunk)
        self.payloads += payloads
        self.last = now

    def add_lines(self, seq: int, lines: list[bytes], now: float) -> None:
        """Append chunk `seq`'s lines of this batch's partition."""
        self.pending += lines
        self.holds.append(seq)
        self.nbytes += sum(map(len, lines))
        self.payloads += len(lines)
        self.last = now

    def skip(self, seq: int) -> None:
        """Chunk `seq`, in its range, is not part of this batch (its spool write was refused)."""
        self.skipped.append(seq)

    def encode(self) -> None:
        if self.pending and self.encoder is not None:
            self.encoder.feed(b"".join(self.pending))
            self.pending = []

    @property
    def full(self) -> bool:
        return self.nbytes >= self.max_bytes or self.payloads >= self.max_payloads

    def close(self, keys: KeyMaker) -> Upload:
        last = self.holds[-1] if self.holds else self.first + self.chunks + len(self.skipped) - 1
        seqs = range(self.first, last + 1)
        key = keys.batch(
            self.opened,
            seqs.start,
            seqs.stop - 1,
            extension("ndjson" if self.writer is None else "parquet", self.compression),
            self.partition,
            hours=self.partitioner is None or not self.partitioner.by_event_time,
        )
        sealed = (b"", "", "")
        if self.encoder is not None:
            self.encode()
            sealed = self.encoder.finish()
        return Upload.batch(
            key,
            seqs,
            self.compression,
            opened=self.opened,
            last=self.last,
            raw_size=self.nbytes,
            payloads=self.payloads,
            excluded=frozenset(s for s in self.skipped if s < seqs.stop),
            sealed=sealed,
            parts=self.pending if self.encoder is None else None,
            writer=self.writer,
            keys=keys,
            partition=self.partition,
            partitioner=self.partitioner,
            holds=tuple(self.holds) if self.partitioner is not None else None,
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
