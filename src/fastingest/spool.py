"""The on-disk spool: what makes "acknowledged" survive ``kill -9`` and a sink outage.

Every accepted request is appended, in acceptance order, to an append-only
segment file as one record. A flusher task writes whatever has accumulated in
one go and fsyncs it when a record in it asked for that (group commit: requests
that arrive together share one fsync), so a ``durable`` answer costs one fsync
shared by many requests. A write with an fsync runs in the spool's own thread;
one without goes to the page cache from the event loop, which costs less than
the thread hop. Whatever may wait on the disk (an fsync, starting a segment,
deleting one) stays off the event loop.

Records taken at ack level ``received`` ask for no fsync: that level promises
only a graceful stop. They are still written within a flush or so of their
answer, so they survive ``kill -9`` (the page cache outlives the process), and
the next fsync of their segment makes them durable too.

A request's chunk is a ``DATA`` record; a closing batch's ``BATCH`` marker is
written (and fsynced) before its upload, so after a crash replay rebuilds exactly
the objects that may already have been uploaded, under the same keys, and a
conditional PUT turns the repeat into a no-op. The file format is in
``spool_records``; which segment holds what, and what is stored, in ``spool_ledger``.

A failed write answers the records someone waits on (``durable`` requests) with
SpoolError, and their chunks are listed in ``refused`` so that the pipeline
leaves them out; the records nobody waits on (``received`` requests, batch
markers) were already answered or cannot be refused, so they are written again,
in order, into a fresh segment once the disk takes writes again.

Segments are deleted oldest first once fully stored (see ``spool_ledger``); the
active segment is rolled and freed as soon as it is fully stored.
A torn or corrupt tail found at start is moved to ``quarantine/`` and reported;
the process starts anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import queue
import secrets
import threading
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path

import orjson

from fastingest import metrics
from fastingest.spool_ledger import Ledger, Segment
from fastingest.spool_records import (
    BATCH,
    DATA,
    MAGIC,
    SEGMENT_HEADER,
    Marker,
    Record,
    head,
    read_chunks,
    read_segment,
)

log = logging.getLogger("fastingest.spool")

MIN_SEGMENT_BYTES = 64 * 1024
MAX_SEGMENT_BYTES = 64 * 1024 * 1024
SEGMENTS_PER_SPOOL = 8  # segments are sized so that a full spool holds about this many
FAILED_BACKOFF = 1.0  # seconds new requests are refused, and writes wait, after a failed write


def segment_size(max_bytes: int) -> int:
    """A segment is freed only whole: small enough that a full spool can give space back."""
    return max(MIN_SEGMENT_BYTES, min(MAX_SEGMENT_BYTES, max_bytes // SEGMENTS_PER_SPOOL))


class SpoolError(Exception):
    """The spool cannot take more now: full, or the disk failed. Answer 503."""


# A buffered record: (ticket, kind, seq, payloads); its head and body are in _buffer.
_Entry = tuple[int, int, int, int]
# A waiter: (ticket, callback, refuses): `refuses` turns a failed write of its record into
# a refusal (its client is answered 503) instead of writing the record again.
_Waiter = tuple[int, Callable[["SpoolError | None"], None], bool]


class Spool:
    def __init__(self, root: Path, max_bytes: int, segment_bytes: int | None = None) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or segment_size(max_bytes)
        self.quarantine = root / "quarantine"
        self.id = ""  # stable across restarts of this spool directory
        self.epoch = 0  # increments at every start: keys never repeat across restarts
        self.ledger = Ledger()
        self._buffer: list[bytes] = []  # record heads and bodies, in order
        self._entries: list[_Entry] = []  # one per buffered record, in the same order
        self._buffered = 0
        self._buffered_payloads = 0
        self._appended = 0  # records appended, ever
        self._sync_through = 0  # the last record that asked for an fsync (or was waited on)
        self._durable = 0  # records known to be on disk
        self._unsynced_payloads = 0  # written since the last fsync
        self._waiters: list[_Waiter] = []
        self._flusher: asyncio.Task[None] | None = None
        self._syncer = _Syncer()
        self._file: int = -1
        self._index = 0  # of the segment being written, within this epoch
        self._lock_fd = -1
        self._failed_until = 0.0
        self._failing = False  # the last write failed; logged once until one succeeds
        self._rotate_after = 0.0  # loop time; a failed rotation is retried after it
        self._unlinking: set[asyncio.Future[None]] = set()
        # Data seq -> payloads, for chunks whose write failed and whose clients got 503.
        self.refused: dict[int, int] = {}
        self.on_disk = 0  # bytes in segment files
        self.damaged = 0  # quarantined tails found at start

    # --- start: lock, identity, replay ---------------------------------------

    def open(self) -> list[Record]:
        """Lock the directory, read what earlier runs left, start a new segment."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock()
            self.id = self._state("id", lambda old: old or secrets.token_hex(4))
            self.epoch = int(self._state("epoch", lambda old: str(int(old or 0) + 1)))
        except OSError as exc:
            raise SystemExit(f"fastingest: cannot use the spool {self.root}: {exc}") from None
        records: list[Record] = []
        for path in sorted(self.root.glob("seg-*.log")):
            epoch, found, size, damaged = read_segment(path, self.quarantine)
            self.damaged += damaged
            self.ledger.load(Segment(path, epoch, size), found)
            records += found
            self.on_disk += size
        try:
            self._rotate()
        except OSError as exc:
            raise SystemExit(
                f"fastingest: cannot start a spool segment in {self.root}: {exc.strerror or exc}"
            ) from None
        return records

    def partitionings(self, current: str, records: list[Record]) -> dict[int, str]:
        """How each run with chunks in `records` split them into partitions (its spec; ""
        for none), with this run's `current` kept durably first: a replay splits each
        chunk as the run that took it did."""
        epochs = {r.epoch for r in records}
        kept: dict[int, str] = {}

        def update(old: str) -> str:
            known = orjson.loads(old) if old else {}
            kept.update({int(e): spec for e, spec in known.items() if int(e) in epochs})
            kept[self.epoch] = current
            return orjson.dumps({str(e): kept[e] for e in sorted(kept)}).decode()

        try:
            self._state("partitioning", update)
        except OSError as exc:
            raise SystemExit(f"fastingest: cannot use the spool {self.root}: {exc}") from None
        return kept

    def _lock(self) -> None:
        """Hold the directory for this process; name the holder if another one has it."""
        path = self.root / "LOCK"
        self._lock_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "unknown"
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise SystemExit(
                f"fastingest: spool {self.root} is in use by another process (pid {holder})"
            ) from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)

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

    # --- writing ---------------------------------------------------------------

    @property
    def full(self) -> bool:
        """Whether new requests are refused now (the bound is reached, or the disk failed)."""
        try:
            self.check(0)
        except SpoolError:
            return True
        return False

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
        self._appended += 1
        self._entries.append((self._appended, kind, seq, payloads))
        self._buffered += len(before) + len(body)
        self._buffered_payloads += payloads
        if sync:
            self._sync_through = self._appended
        self._start_flusher()
        return self._appended

    def append_marker(self, marker: Marker) -> int:
        """Record a closed batch's boundaries (fsynced); returns the ticket to wait on."""
        return self.append(BATCH, marker.first, marker.opened, marker.pack())

    def when_durable(
        self,
        ticket: int,
        callback: Callable[[SpoolError | None], None],
        *,
        refuses: bool = True,
    ) -> None:
        """Call ``callback(None)`` once record `ticket` is fsynced, ``callback(error)`` if its
        write failed: at once if it already is, else from the flusher, on the event loop.

        A callback, not a future to await: a ``durable`` request is answered from here
        without a task of its own (a task and its coroutines cost more than the request's
        share of the fsync). Without `refuses`, a failed write does not refuse the record:
        it is written again, and the callback waits for that.
        """
        if ticket <= self._durable:
            callback(None)
            return
        if ticket > self._sync_through:  # appended without sync: it needs one now
            self._sync_through = ticket
            self._start_flusher()
        self._waiters.append((ticket, callback, refuses))

    async def wait(self, ticket: int, *, refuses: bool = True) -> None:
        """Return once record `ticket` is fsynced; SpoolError if its write failed."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.when_durable(ticket, functools.partial(_resolve, fut), refuses=refuses)
        await fut

    async def settled(self) -> None:
        """Return once every record appended so far is durable or refused."""
        if self._appended > self._durable:
            await self.wait(self._appended, refuses=False)

    def _start_flusher(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush(), name="spool-flush"
            )

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if self.ledger.reclaimable():
                    await self._roll()
                if not (self._buffer or self._sync_through > self._durable):
                    break
                if self._failing:  # let the disk recover before writing the kept records again
                    await asyncio.sleep(max(0.0, self._failed_until - loop.time()))
                buffer, entries = self._buffer, self._entries
                data, upto, payloads = b"".join(buffer), self._appended, self._buffered_payloads
                self._buffer, self._entries = [], []
                self._buffered = self._buffered_payloads = 0
                seg = self.ledger.segments[-1]
                full = seg.size + len(data) >= self.segment_bytes
                sync = self._sync_through > self._durable or full  # a segment ends fsynced
                try:
                    if sync:
                        await self._syncer.write(self._file, data, seg.size)
                    else:
                        _write(self._file, data, seg.size, False)
                except OSError as exc:
                    self._failed(upto, exc, buffer, entries)
                    continue
                if self._failing:
                    self._failing = False
                    log.warning("spool writes succeed again")
                # Bookkeeping stays on the event loop; the thread only wrote and synced.
                seqs = [e[2] for e in entries if e[1] == DATA]
                marks = [e[2] for e in entries if e[1] == BATCH] if len(seqs) < len(entries) else []
                self.ledger.wrote(seg, seqs, marks)
                seg.size += len(data)
                self.on_disk += len(data)
                self._unsynced_payloads += payloads
                if sync:
                    self._durable = upto
                    metrics.PAYLOADS_DURABLE.inc(self._unsynced_payloads)
                    self._unsynced_payloads = 0
                    self._settle(upto)
                if full:
                    await self._roll()
        finally:
            self._flusher = None

    async def _roll(self) -> None:
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
        self._free()

    def _failed(self, upto: int, exc: OSError, buffer: list[bytes], entries: list[_Entry]) -> None:
        """A write failed: refuse the records clients wait on, keep the rest to write again."""
        if not self._failing:
            log.error("SPOOL WRITE FAILED (%s): refusing requests that need it; will retry", exc)
        self._failing = True
        self._failed_until = asyncio.get_running_loop().time() + FAILED_BACKOFF
        error = SpoolError(f"spool write failed: {exc.strerror or exc}")
        claimed = {t for t, _, refuses in self._waiters if refuses and t <= upto}
        kept_buffer: list[bytes] = []
        kept: list[_Entry] = []
        refused_tickets = set()
        for i, entry in enumerate(entries):
            ticket, kind, seq, payloads = entry
            if kind == DATA and ticket in claimed:
                self.refused[seq] = payloads
                refused_tickets.add(ticket)
            else:
                kept.append(entry)
                kept_buffer += buffer[2 * i : 2 * i + 2]
        self._buffer = kept_buffer + self._buffer
        self._entries = kept + self._entries
        self._buffered += sum(len(b) for b in kept_buffer)
        self._buffered_payloads += sum(e[3] for e in kept)
        if not kept and not self._entries and self._sync_through <= upto:
            self._durable = upto  # nothing left that this write owed anyone
        waiting = []
        for waiter in self._waiters:
            if waiter[0] in refused_tickets:
                _call(waiter[1], error)
            else:
                waiting.append(waiter)
        self._waiters = waiting
        try:  # a fresh segment: the failed one may sit on a bad region or at a size limit
            self._rotate()
        except OSError as again:
            log.error("cannot start a new spool segment either (%s)", again)
        else:
            self._free()

    def _settle(self, upto: int) -> None:
        keep = []
        for waiter in self._waiters:
            if waiter[0] > upto:
                keep.append(waiter)
            else:
                _call(waiter[1], None)
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
        self.ledger.begin(Segment(path, self.epoch, SEGMENT_HEADER.size))
        self.on_disk += SEGMENT_HEADER.size

    # --- completion ------------------------------------------------------------

    def stored(self, seqs: Iterable[int], marker: int | None = None) -> None:
        """Chunks `seqs` (and the batch marker keyed by `marker`) are stored; free segments."""
        self.ledger.stored(seqs, marker)
        self._free()

    def _free(self) -> None:
        """Delete the oldest segments while they are fully stored; roll a stored active one."""
        while (seg := self.ledger.freeable()) is not None:
            self._drop(seg)
        if self.ledger.reclaimable():
            self._start_flusher()  # it rolls the segment before it writes anything new

    def _drop(self, seg: Segment) -> None:
        self.ledger.drop(seg)
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

    # --- reading back ------------------------------------------------------------

    @property
    def segments(self) -> list[Segment]:
        """The segment files, oldest first; the last one is being written."""
        return self.ledger.segments

    @property
    def oldest_seq(self) -> int:
        """The lowest data seq still in a segment (or one past the last written)."""
        return self.ledger.oldest_seq

    def written(self, seq: int) -> bool:
        """Whether data seq `seq` has reached a segment file (not only the write buffer)."""
        return seq <= self.ledger.written_seq

    async def read(self, start: int, stop: int) -> dict[int, tuple[bytes, float]]:
        """The chunks with seqs in [start, stop) that the segments hold: seq -> (body, time).

        Read in a thread. Every seq asked for must have been written (see written()).
        """
        return await asyncio.to_thread(read_chunks, self.ledger.plan(start, stop), start, stop)

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
        while (seg := self.ledger.freeable(active=True)) is not None:  # oldest first, as always
            self._drop(seg)
        await self.unlinked()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _call(callback: Callable[[SpoolError | None], None], error: SpoolError | None) -> None:
    try:
        callback(error)
    except Exception:  # a bug in one waiter must not stop the flusher for all
        log.exception("a spool waiter failed")


def _resolve(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if not fut.done():  # cancelled meanwhile: nobody waits
        fut.set_exception(error) if error else fut.set_result(None)


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
    a third of the executor's (bench/README.md, ack levels), once per group commit, which
    at ``durable`` is about a thousand times a second.
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
