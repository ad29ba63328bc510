"""The on-disk spool: what makes "acknowledged" survive ``kill -9``.

Every accepted request is appended, in acceptance order, to an append-only
segment file as one record. A flusher task writes whatever has accumulated in
one go and fsyncs it when a record in it asked for that (group commit: requests
that arrive together share one fsync), so a ``durable`` answer costs one fsync
shared by many requests. A write with an fsync runs in a thread; one without
goes to the page cache from the event loop, which costs less than the thread hop.
Whatever may wait on the disk (an fsync, starting a segment, deleting one: a
64 MiB unlink took 21 ms here) stays off the event loop.

Records taken at ack level ``received`` ask for no fsync: that level promises
only a graceful stop, and an fsync here costs a vCPU 0.1-0.7 ms (measured: see
bench/README.md). They are still written within a flush or so of their answer,
so they survive ``kill -9`` (the page cache outlives the process), and the next
fsync of their segment (a ``durable`` request, a batch marker, the segment's
end) makes them durable too.

Record: ``<u32 body length><u32 crc32 of the rest><u8 kind><u64 seq><f64 time><body>``.
``DATA`` records hold one request's NDJSON chunk under its sequence number.
``BATCH`` records are written (and fsynced) when a batch closes, before its
upload: ``seq`` is its first chunk, the body its last chunk and its object key.
So after a crash, replay rebuilds exactly the objects that may already have
been uploaded, under the same keys, and a conditional PUT turns the repeat
into a no-op instead of a duplicate.

A segment is deleted once every record in it is stored (uploaded or
dead-lettered). A torn or corrupt tail found at start is moved to
``quarantine/`` and reported; the process starts anyway.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import fcntl
import functools
import logging
import os
import queue
import secrets
import struct
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from zlib_ng.zlib_ng import crc32  # zlib's CRC-32 with SIMD: 356 B in 109 ns, zlib's 371

from fastingest import metrics

log = logging.getLogger("fastingest.spool")

MAGIC = b"FISPOOL1"
SEGMENT_HEADER = struct.Struct("<8sI")  # magic, epoch
_LENGTH_CRC = struct.Struct("<II")  # body length, crc32 of what follows
_META = struct.Struct("<BQd")  # kind, seq, time
RECORD = struct.Struct(_LENGTH_CRC.format + _META.format[1:])  # a record's head, as read
CRC_FROM = _LENGTH_CRC.size  # the crc covers kind, seq, time and body
LAST_SEQ = struct.Struct("<Q")
DATA, BATCH = 1, 2
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
MAX_RECORD = 1 << 30
FAILED_BACKOFF = 1.0  # seconds new requests are refused after a failed flush


class SpoolError(Exception):
    """The spool cannot take more now: full, or the disk failed. Answer 503."""


@dataclass(slots=True)
class Record:
    kind: int
    seq: int
    time: float
    body: bytes
    epoch: int  # of the process that wrote it

    @property
    def batch(self) -> tuple[int, str]:
        """For BATCH records: (last seq, key)."""
        (last,) = LAST_SEQ.unpack_from(self.body)
        return last, self.body[LAST_SEQ.size :].decode()


def frame(kind: int, seq: int, ts: float, body: bytes) -> bytes:
    return head(kind, seq, ts, body) + body


def head(kind: int, seq: int, ts: float, body: bytes) -> bytes:
    """A record's bytes before its body (the spool writes the two without joining them)."""
    meta = _META.pack(kind, seq, ts)
    return _LENGTH_CRC.pack(len(body), crc32(body, crc32(meta))) + meta


@dataclass(slots=True)
class Segment:
    path: Path
    epoch: int
    size: int = 0
    seqs: list[int] = field(default_factory=list)  # data seqs, ascending
    pending: int = 0  # records not yet stored (data chunks and batch markers)


def read_segment(path: Path, quarantine: Path) -> tuple[int, list[Record], int, bool]:
    """(epoch, records, good size, damaged). A damaged tail is moved to `quarantine`."""
    data = path.read_bytes()
    if len(data) < SEGMENT_HEADER.size or data[:8] != MAGIC:
        _quarantine(path, data, 0, quarantine, "bad segment header")
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
        records.append(Record(kind, seq, ts, data[pos + RECORD.size : end], epoch))
        pos = end
    else:
        return epoch, records, pos, False
    _quarantine(path, data, pos, quarantine, reason)
    return epoch, records, pos, True


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


class Spool:
    def __init__(
        self, root: Path, max_bytes: int, segment_bytes: int = DEFAULT_SEGMENT_BYTES
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.quarantine = root / "quarantine"
        self.id = ""  # stable across restarts of this spool directory
        self.epoch = 0  # increments at every start: keys never repeat across restarts
        self.segments: list[Segment] = []  # oldest first; the last one is being written
        self._by_seq: list[tuple[int, Segment]] = []  # (first data seq, segment), ascending
        self._marks: dict[int, Segment] = {}  # batch first seq -> segment of its marker
        self._early: set[tuple[int, int]] = set()  # (kind, seq) stored before it was written
        self._buffer: list[bytes] = []  # record heads and bodies, in order
        self._data_seqs: list[int] = []  # of the buffered DATA records, ascending
        self._marker_seqs: list[int] = []  # of the buffered BATCH records
        self._buffered_payloads = 0
        self._buffered = 0
        self._appended = 0  # records appended, ever
        self._sync_through = 0  # the last record that asked for an fsync (or was waited on)
        self._durable = 0  # records known to be on disk
        self._unsynced_payloads = 0  # written since the last fsync
        self._waiters: list[tuple[int, Callable[[SpoolError | None], None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._syncer = _Syncer()
        self._file: int = -1
        self._index = 0  # of the segment being written, within this epoch
        self._lock_fd = -1
        self._failed_until = 0.0
        self._rotate_after = 0.0  # loop time; a failed rotation is retried after it
        self._unlinking: set[asyncio.Future[None]] = set()
        self.on_disk = 0  # bytes in segment files
        self.damaged = 0  # quarantined tails found at start

    # --- start: lock, identity, replay ---------------------------------------

    def open(self) -> list[Record]:
        """Lock the directory, read what earlier runs left, start a new segment."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.root / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(
                f"fastingest: spool {self.root} is in use by another process"
            ) from None
        self.id = self._state("id", lambda old: old or secrets.token_hex(4))
        self.epoch = int(self._state("epoch", lambda old: str(int(old or 0) + 1)))
        records: list[Record] = []
        for path in sorted(self.root.glob("seg-*.log")):
            epoch, found, size, damaged = read_segment(path, self.quarantine)
            self.damaged += damaged
            seg = Segment(path, epoch, size)
            self.segments.append(seg)
            data = [r.seq for r in found if r.kind == DATA]
            self._count(seg, data, [r.seq for r in found if r.kind == BATCH])
            records += found
            self.on_disk += size
        self._rotate()
        return records

    def _state(self, name: str, update: Callable[[str], str]) -> str:
        """Read, update and durably rewrite a small state file of the spool."""
        path = self.root / name
        old = path.read_text().strip() if path.exists() else ""
        new = update(old)
        if new != old:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(new)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(self.root)
        return new

    def _count(self, seg: Segment, data: list[int], markers: list[int]) -> None:
        """These records now live in `seg` and are pending until stored()."""
        if self._early:  # some were stored before they reached the disk: they are done
            data, markers = self._not_early(DATA, data), self._not_early(BATCH, markers)
        seg.pending += len(data) + len(markers)
        if data:
            if not seg.seqs:
                self._by_seq.append((data[0], seg))
            seg.seqs += data
        for seq in markers:
            self._marks[seq] = seg

    def _not_early(self, kind: int, seqs: list[int]) -> list[int]:
        kept = []
        for seq in seqs:
            if (kind, seq) in self._early:
                self._early.discard((kind, seq))
            else:
                kept.append(seq)
        return kept

    # --- writing ---------------------------------------------------------------

    def check(self, size: int) -> None:
        """Raise SpoolError unless a record of `size` bytes may be taken now."""
        if self._failed_until and asyncio.get_running_loop().time() < self._failed_until:
            raise SpoolError("the spool disk failed a moment ago; retry shortly")
        if self.on_disk + self._buffered + size > self.max_bytes:
            raise SpoolError(f"the spool holds {self.on_disk + self._buffered} bytes, its limit")

    def append(
        self, kind: int, seq: int, ts: float, body: bytes, payloads: int = 0, *, sync: bool = True
    ) -> int:
        """Buffer a record; the flusher writes it soon, and fsyncs it if `sync`.

        Returns its ticket for wait(), which fsyncs it in any case.
        """
        before = head(kind, seq, ts, body)
        self._buffer += (before, body)
        (self._data_seqs if kind == DATA else self._marker_seqs).append(seq)
        self._buffered_payloads += payloads
        self._buffered += len(before) + len(body)
        self._appended += 1
        if sync:
            self._sync_through = self._appended
        self._start_flusher()
        return self._appended

    def when_durable(self, ticket: int, callback: Callable[[SpoolError | None], None]) -> None:
        """Call ``callback(None)`` once record `ticket` is fsynced, ``callback(error)`` if its
        write failed: at once if it already is, else from the flusher, on the event loop.

        A callback, not a future to await: a ``durable`` request is answered from here
        without a task of its own (a task and its coroutines cost more than the request's
        share of the fsync).
        """
        if ticket <= self._durable:
            callback(None)
            return
        if ticket > self._sync_through:  # appended without sync: it needs one now
            self._sync_through = ticket
            self._start_flusher()
        self._waiters.append((ticket, callback))

    async def wait(self, ticket: int) -> None:
        """Return once record `ticket` is fsynced; SpoolError if its write failed."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.when_durable(ticket, functools.partial(_resolve, fut))
        await fut

    def _start_flusher(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush(), name="spool-flush"
            )

    async def _flush(self) -> None:
        try:
            while self._buffer or self._sync_through > self._durable:
                data, seqs, markers = b"".join(self._buffer), self._data_seqs, self._marker_seqs
                upto = self._appended
                self._unsynced_payloads += self._buffered_payloads
                self._buffer, self._data_seqs, self._marker_seqs = [], [], []
                self._buffered = self._buffered_payloads = 0
                seg = self.segments[-1]
                full = seg.size + len(data) >= self.segment_bytes
                sync = self._sync_through > self._durable or full  # a segment ends fsynced
                try:
                    if sync:
                        await self._syncer.write(self._file, data, seg.size)
                    else:
                        _write(self._file, data, seg.size, False)
                except OSError as exc:
                    self._failed(upto, exc)
                    continue
                # Bookkeeping stays on the event loop; the thread only wrote and synced.
                seg.size += len(data)
                self.on_disk += len(data)
                self._count(seg, seqs, markers)
                if sync:
                    self._durable = upto
                    metrics.PAYLOADS_DURABLE.inc(self._unsynced_payloads)
                    self._unsynced_payloads = 0
                    self._settle(upto, None)
                if full:
                    await self._roll(seg)
        finally:
            self._flusher = None

    async def _roll(self, full: Segment) -> None:
        """Start the next segment, in a thread; records appended meanwhile wait in the buffer."""
        loop = asyncio.get_running_loop()
        if loop.time() < self._rotate_after:
            return
        path = self._next_path()
        try:
            fd = await asyncio.to_thread(_new_segment, path, self.epoch)
        except OSError as exc:
            log.error("cannot start a new spool segment (%s); the full one grows meanwhile", exc)
            self._rotate_after = loop.time() + FAILED_BACKOFF
            return
        self._begin(path, fd)
        if full.pending <= 0:  # stored while it was still the active segment
            self._drop(full)

    def _failed(self, upto: int, exc: OSError) -> None:
        log.error("SPOOL WRITE FAILED (%s): refusing requests that need it; will retry", exc)
        self._failed_until = asyncio.get_running_loop().time() + FAILED_BACKOFF
        self._durable = upto  # nothing waits on these any more: they were answered 503
        self._unsynced_payloads = 0
        self._settle(upto, SpoolError(f"spool write failed: {exc.strerror or exc}"))
        try:  # a fresh segment: the failed one may sit on a bad region or at a size limit
            self._rotate()
        except OSError as again:
            log.error("cannot start a new spool segment either (%s)", again)

    def _settle(self, upto: int, exc: SpoolError | None) -> None:
        keep = []
        for ticket, callback in self._waiters:
            if ticket > upto:
                keep.append((ticket, callback))
                continue
            try:
                callback(exc)
            except Exception:  # a bug in one waiter must not stop the flusher for all
                log.exception("a spool waiter failed")
        self._waiters = keep

    def _rotate(self) -> None:
        """Start the next segment here and now: at start-up, and after a failed write."""
        path = self._next_path()
        self._begin(path, _new_segment(path, self.epoch))

    def _next_path(self) -> Path:
        self._index += 1  # never reuse a name: an older segment may still be on disk
        return self.root / f"seg-{self.epoch:08d}-{self._index:06d}.log"

    def _begin(self, path: Path, fd: int) -> None:
        if self._file >= 0:
            os.close(self._file)
        self._file = fd
        self.segments.append(Segment(path, self.epoch, SEGMENT_HEADER.size))
        self.on_disk += SEGMENT_HEADER.size

    # --- completion ------------------------------------------------------------

    def stored(self, seqs: Iterable[int], marker: int | None = None) -> None:
        """Chunks `seqs` (and the batch marker keyed by `marker`) are stored; free segments.

        A batch's seqs are a range, and each segment holds a run of consecutive seqs, so
        a range is settled a segment at a time, not a seq at a time: this runs on the
        event loop, for up to --batch-max-payloads seqs at once.
        """
        touched: set[int] = set()
        firsts = [first for first, _ in self._by_seq]
        for seq, stop in _runs(seqs):
            while seq < stop:
                i = bisect.bisect_right(firsts, seq) - 1
                if i < 0 or seq > self._by_seq[i][1].seqs[-1]:
                    self._early.add((DATA, seq))  # its record is still in the write buffer
                    seq += 1
                    continue
                seg = self._by_seq[i][1]
                upto = min(stop, seg.seqs[-1] + 1)  # the run's part in this segment
                seg.pending -= upto - seq
                touched.add(id(seg))
                seq = upto
        if marker is not None:
            holder = self._marks.pop(marker, None)
            if holder is None:
                self._early.add((BATCH, marker))
            else:
                holder.pending -= 1
                touched.add(id(holder))
        active = self.segments[-1]
        for seg in [s for s in self.segments if id(s) in touched]:
            if seg.pending <= 0 and seg is not active:
                self._drop(seg)

    def _drop(self, seg: Segment) -> None:
        self.segments.remove(seg)
        self._by_seq = [(f, s) for f, s in self._by_seq if s is not seg]
        self.on_disk -= seg.size
        done = asyncio.get_running_loop().run_in_executor(None, _unlink, seg.path)
        self._unlinking.add(done)
        done.add_done_callback(self._unlinked)

    def _unlinked(self, done: asyncio.Future[None]) -> None:
        self._unlinking.discard(done)
        if not done.cancelled() and (exc := done.exception()) is not None:
            log.error("cannot delete a stored spool segment: %s", exc)

    async def unlinked(self) -> None:
        """Return once the files of the segments freed so far are deleted."""
        await asyncio.gather(*self._unlinking, return_exceptions=True)

    async def close(self) -> None:
        if self._durable < self._appended:  # what `received` left unsynced ends durable
            self._sync_through = self._appended
            self._start_flusher()
        if self._flusher is not None:
            await self._flusher
        self._syncer.stop()
        if self._file >= 0:
            os.close(self._file)
            self._file = -1
        for seg in [s for s in self.segments if s.pending <= 0]:
            self._drop(seg)
        await self.unlinked()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _resolve(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if not fut.done():  # cancelled meanwhile: nobody waits
        fut.set_exception(error) if error else fut.set_result(None)


def _runs(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """Ascending seqs as (start, stop) runs of consecutive ones."""
    if isinstance(seqs, range) and seqs.step == 1:
        return [(seqs.start, seqs.stop)]
    runs: list[list[int]] = []
    for seq in seqs:
        if runs and runs[-1][1] == seq:
            runs[-1][1] = seq + 1
        else:
            runs.append([seq, seq + 1])
    return [(start, stop) for start, stop in runs]


def stranded(root: Path, processes: int) -> list[tuple[Path, int]]:
    """Spools of processes beyond `processes` that still hold data: (path, bytes).

    Worker i replays only <root>/<i>; after lowering --processes, these wait until
    a start with enough processes replays them.
    """
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if path.name.isdigit() and int(path.name) >= processes:
            size = sum(p.stat().st_size for p in path.glob("seg-*.log"))
            if size > SEGMENT_HEADER.size * len(list(path.glob("seg-*.log"))):
                found.append((path, size))
    return found


def _write(fd: int, data: bytes, good_size: int, sync: bool) -> None:
    """Append `data`, fsync if `sync` (then in a thread); on failure cut the file back."""
    try:
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        if sync:
            os.fsync(fd)
    except OSError:
        with contextlib.suppress(OSError):  # leave no half-written group behind
            os.ftruncate(fd, good_size)
        raise


class _Syncer:
    """The thread that writes and fsyncs the spool's groups, one at a time.

    Its own thread and queue rather than ``asyncio.to_thread``: a hop costs the event loop
    about 6 µs of CPU here against the executor's 18 (uvloop, one core), once per group
    commit, which at ``durable`` is about a thousand times a second.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_SyncJob | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._end: weakref.finalize | None = None

    def write(self, fd: int, data: bytes, good_size: int) -> asyncio.Future[None]:
        """`_write` with an fsync, in the thread: a future done when it is (or failed)."""
        fut = asyncio.get_running_loop().create_future()
        if self._thread is None:
            # The thread holds the queue, not this object, so a spool dropped without
            # close() (a crash simulated in-process) still ends it, through the finalizer.
            self._thread = threading.Thread(
                target=_sync_jobs, args=(self._jobs,), name="fastingest-spool-sync", daemon=True
            )
            self._thread.start()
            self._end = weakref.finalize(self, self._jobs.put, None)
        self._jobs.put((fd, data, good_size, fut))
        return fut

    def stop(self) -> None:
        """End the thread once the writes queued before are done."""
        if self._thread is not None and self._end is not None:
            self._end()
            self._thread.join()
            self._thread = self._end = None


_SyncJob = tuple[int, bytes, int, asyncio.Future[None]]  # fd, data, good size, done


def _sync_jobs(jobs: queue.SimpleQueue[_SyncJob | None]) -> None:
    while (job := jobs.get()) is not None:
        fd, data, good_size, fut = job
        error: BaseException | None = None
        try:
            _write(fd, data, good_size, True)
        except Exception as exc:  # handed to the awaiting flusher
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            fut.get_loop().call_soon_threadsafe(_resolve, fut, error)


def _new_segment(path: Path, epoch: int) -> int:
    """Create a segment file with its header, durably (the file and its directory entry)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, SEGMENT_HEADER.pack(MAGIC, epoch))
        os.fsync(fd)
        _fsync_dir(path.parent)
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):  # a headless file would read as damaged at start
            path.unlink()
        raise
    return fd


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
