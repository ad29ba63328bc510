"""The payload's road from an accepted request to the sink.

    submit()  ->  spool: append the chunk (fsynced by group commit)    [ack durable]
              ->  intake: RingQueue of NDJSON chunks (bounded by count and bytes),
                  each chunk's payload count in a deque alongside
              ->  batcher task: chunks -> open Batch (compressed as it grows) -> Upload
                  (or one Upload per payload); a closing batch is recorded in the spool
                  before its upload
              ->  jobs: RingQueue of Upload (a few slots), or, while they are full or
                  the sink fails, the delivery backlog (the bytes stay in the spool)
              ->  WorkerPool -> Delivery.store: sink.put, the retry policy, dead letters
              ->  sink, or the dead-letter directory               [ack uploaded]
              ->  spool: chunks stored, segments freed

Every chunk gets a sequence number when accepted. The intake is FIFO with one
producer (the event loop) and one consumer (the batcher), so the batcher knows
each chunk's number by counting; the numbers name the objects (see KeyMaker).

Whatever the pipeline has accepted is in the spool until it is stored, so a stop
that runs out of time, or a sink that is down, leaves it there for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from fastingest import metrics
from fastingest.batching import (
    CONTENT_TYPES,
    EXTENSIONS,
    Batch,
    KeyMaker,
    Upload,
    per_payload,
)
from fastingest.config import Settings, usable_cpus
from fastingest.deadletter import DeadLetter
from fastingest.delivery import Delivery
from fastingest.errors import QueueClosed, QueueFull
from fastingest.pool import WorkerPool
from fastingest.queue import RingQueue
from fastingest.sinks import Sink
from fastingest.spool import BATCH, DATA, Marker, Record, Spool, SpoolError

log = logging.getLogger("fastingest.pipeline")

DRAIN_CHUNKS = 1024  # chunks the batcher takes from the intake per round
JOBS_WAITING = 4  # closed batches queued for the upload workers
# Added niceness of the threads that seal what the batcher did not (batches read back
# from the spool, large per-payload objects), so that they leave most of a shared core
# to the event loop.
SEAL_NICE = 4
DRAIN_POLL = 0.05  # seconds between looks at the delivery while a stop drains it


def _lower_priority() -> None:
    """Nice the calling thread (Linux schedules threads one by one); elsewhere do nothing."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SEAL_NICE)


class Pipeline:
    def __init__(self, settings: Settings, sink: Sink) -> None:
        self.settings = settings
        self.sink = sink
        self.spool = Spool(settings.spool_path, settings.spool_max_bytes)
        self.per_payload = settings.mode == "per-payload"
        self.intake: RingQueue[bytes] = RingQueue(settings.max_queue, settings.max_queue_bytes)
        # The payload count of each chunk in the intake, in the same order: known when the
        # chunk is accepted, so the batcher need not count its lines again.
        self._counts: deque[int] = deque()
        # A few closed batches waiting for a worker keep the workers busy; the rest wait in
        # the delivery backlog, their bytes in the spool, not in memory.
        self.jobs: RingQueue[Upload] = RingQueue(min(settings.max_workers, JOBS_WAITING))
        # Batches come sealed from the batcher; what it did not seal (see SEAL_NICE) is
        # sealed here, one thread per CPU (zlib and zstd drop the GIL).
        self._sealer = ThreadPoolExecutor(
            usable_cpus(), thread_name_prefix="fastingest-seal", initializer=_lower_priority
        )
        self.dead_letter = DeadLetter(settings.dead_letter_path)
        self.delivery = Delivery(
            sink,
            self.spool,
            self.dead_letter,
            self.jobs,
            self._done,
            window=settings.delivery_window,
            retry_base=settings.retry_base_delay,
            retry_max=settings.retry_max_delay,
            sealer=self._sealer,
        )
        self.pool: WorkerPool[Upload] = WorkerPool(
            settings.max_workers,
            self.delivery.store,
            self.jobs,
            on_error=self._unexpected,
            name="fastingest-upload",
        )
        self.keys: KeyMaker | None = None  # known once the spool is open
        self._next_seq = 0  # given to the next accepted chunk
        self._taken_seq = 0  # of the next chunk the batcher takes from the intake
        self._open: Batch | None = None
        self._open_deadline = 0.0  # monotonic time the open batch must close by
        self._open_waiters = 0  # requests with ack "uploaded" whose chunk is in the open batch
        self._queued_payloads = 0  # payloads in the intake (for the metric)
        self._handoff: deque[Upload] = deque()  # closed, not yet in `jobs` or the backlog
        self._parts_left: dict[int, int] = {}  # per-payload mode: seq -> objects to go
        self._upload_waiters: dict[int, asyncio.Future[bool]] = {}  # seq -> ack "uploaded"
        self._batcher: asyncio.Task[None] | None = None
        self._accepted = metrics.tally(metrics.PAYLOADS_ACCEPTED)

    # --- start ------------------------------------------------------------------

    async def start(self) -> None:
        """Open the spool, start the workers, and put back what an earlier run left."""
        records = self.spool.open()
        self.keys = KeyMaker(self.sink.prefix, self.spool.id, self.spool.epoch)
        seqs = [r.seq for r in records] + [r.batch.last for r in records if r.kind == BATCH]
        self._next_seq = self._taken_seq = max(seqs, default=-1) + 1
        self._batcher = asyncio.get_running_loop().create_task(
            self._batch_loop(), name="fastingest-batcher"
        )
        metrics.SINK_UP.set(1)
        self.delivery.start()
        self.pool.start()
        if records:
            await self._replay(records)

    async def _replay(self, records: list[Record]) -> None:
        """Rebuild the objects a crashed run may have uploaded (same keys), requeue the rest."""
        assert self.keys is not None
        data = {r.seq: r for r in records if r.kind == DATA}
        lowest = min(data, default=0)  # chunks below it were in segments deleted as stored
        covered: set[int] = set()
        for m in (r.batch for r in records if r.kind == BATCH):
            covered.update(range(m.first, m.last + 1))
            wanted = m.seqs
            present = [s for s in wanted if s in data]
            missing = [s for s in wanted if s not in data]
            if not present or (missing and max(missing) < lowest):
                # Its first chunks' segment is gone, which only a stored batch allows.
                self.spool.stored(present, marker=m.first)
                continue
            if missing:
                log.error(
                    "spool: %d chunks of %s are damaged; storing the %d that are left",
                    len(missing),
                    m.key,
                    len(present),
                )
            compression = next((c for c, ext in EXTENSIONS.items() if m.key.endswith(ext)), "none")
            upload = Upload(
                m.key,
                [],
                sum(len(data[s].body) for s in present),
                sum(data[s].body.count(b"\n") for s in present),
                m.opened,
                max(data[s].time for s in present),
                CONTENT_TYPES[compression],
                range(m.first, m.last + 1),
                m.first,
                compression,
                excluded=m.excluded | frozenset(missing),
            )
            metrics.PAYLOADS_REPLAYED.inc(upload.payloads)
            self.delivery.park(upload)  # read back from the spool when a worker takes it
        requeue = [data[s] for s in sorted(data) if s not in covered]
        if self.per_payload:
            for r in requeue:
                uploads = per_payload(r.body, r.seq, self.keys, r.time, r.epoch)
                if len(uploads) > 1:
                    self._parts_left[r.seq] = len(uploads)
                for upload in uploads:
                    metrics.PAYLOADS_REPLAYED.inc(upload.payloads)
                    self.delivery.park(upload)
        else:
            # Never part of a recorded batch, so never uploaded: batched where they lie, each
            # batch recorded before its upload like any other, so that a crash during this
            # replay leaves them covered, never requeued twice.
            group: list[Record] = []
            size = payloads = 0
            for r in requeue:
                if group and (
                    r.seq != group[-1].seq + 1
                    or size >= self.settings.batch_max_bytes
                    or payloads >= self.settings.batch_max_payloads
                ):
                    await self._rebatch(group)
                    group, size, payloads = [], 0, 0
                group.append(r)
                size += len(r.body)
                payloads += r.body.count(b"\n")
            if group:
                await self._rebatch(group)
        log.info(
            "replayed the spool: %d chunks, %d damaged tails quarantined",
            len(data),
            self.spool.damaged,
        )

    async def _rebatch(self, chunks: list[Record]) -> None:
        """Record consecutive chunks an earlier run left unbatched as a batch, then queue it."""
        assert self.keys is not None
        compression = self.settings.compression
        first, last = chunks[0], chunks[-1]
        upload = Upload(
            self.keys.batch(first.time, first.seq, last.seq, EXTENSIONS[compression]),
            [],
            sum(len(c.body) for c in chunks),
            sum(c.body.count(b"\n") for c in chunks),
            first.time,
            max(c.time for c in chunks),
            CONTENT_TYPES[compression],
            range(first.seq, last.seq + 1),
            first.seq,
            compression,
        )
        await self._record_batch(upload)
        metrics.BATCHES_CLOSED.inc()
        metrics.PAYLOADS_REPLAYED.inc(upload.payloads)
        self.delivery.park(upload)

    # --- intake -----------------------------------------------------------------

    def submit(
        self, chunk: bytes, payloads: int, *, sync: bool = True, want_upload: bool = False
    ) -> tuple[int, asyncio.Future[bool] | None]:
        """Queue one request's payloads, taking all or nothing.

        Returns the spool ticket (for durable()) and, with `want_upload`, a future
        that resolves once the chunk is stored: True in the sink, False in the
        dead-letter directory. Without `sync` (ack ``received``) its spool record
        is written but not fsynced on its own account. Raises QueueFull,
        QueueClosed or SpoolError.
        """
        self.spool.check(len(chunk))
        self.intake.put_nowait(chunk)
        self._counts.append(payloads)
        self._accepted.n += payloads
        self._queued_payloads += payloads
        stored = None
        if want_upload:  # registered before the batcher can see the chunk
            stored = asyncio.get_running_loop().create_future()
            self._upload_waiters[self._next_seq] = stored
        return self._spool_data(chunk, payloads, sync), stored

    def _spool_data(self, chunk: bytes, payloads: int, sync: bool = True) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return self.spool.append(DATA, seq, time.time(), chunk, payloads, sync=sync)

    def when_durable(self, ticket: int, callback: Callable[[SpoolError | None], None]) -> None:
        """Call back once the chunk behind `ticket` is fsynced, with the SpoolError if not."""
        self.spool.when_durable(ticket, callback)

    @property
    def accepting(self) -> bool:
        return not self.intake.closed

    def unready(self) -> str | None:
        """Why new requests would be refused now (spool or memory full), or None."""
        if self.spool.full:
            return "spool_full"
        if self.intake.full():
            return "queue_full"
        return None

    # --- batcher ----------------------------------------------------------------

    async def _batch_loop(self) -> None:
        intake = self.intake
        while True:
            try:
                chunks = intake.get_many(DRAIN_CHUNKS)
                if not chunks:
                    chunks = await self._wait_for_chunks()
            except QueueClosed:
                break
            if chunks:
                self._frame(chunks)  # no await: every chunk lands in self._open or self._handoff
            elif self._open is not None:  # the open batch reached its age
                self._close_open()
            metrics.flush()  # before any of these chunks can be counted as uploaded
            await self._hand_over()
        self._close_open()
        await self._hand_over()

    async def _wait_for_chunks(self) -> list[bytes]:
        if self._open is None:
            return await self.intake.aget_many(DRAIN_CHUNKS)
        if self._open_waiters:  # a client waits for this batch: close it now the intake is dry
            return []
        left = self._open_deadline - time.monotonic()
        if left <= 0:
            return []
        try:
            return await asyncio.wait_for(self.intake.aget_many(DRAIN_CHUNKS), left)
        except TimeoutError:
            return []

    def _frame(self, chunks: list[bytes]) -> None:
        assert self.keys is not None
        now = time.time()
        s = self.settings
        counts = self._counts
        refused = self.spool.refused
        for chunk in chunks:
            seq = self._taken_seq
            self._taken_seq += 1
            payloads = counts.popleft()
            self._queued_payloads -= payloads
            if refused and seq in refused:  # answered 503: the client sends it again
                self._withdraw(seq)
                if self._open is not None:
                    self._open.skip(seq)
                continue
            if self.per_payload:
                uploads = per_payload(chunk, seq, self.keys, now)
                if len(uploads) > 1:
                    self._parts_left[seq] = len(uploads)
                self._handoff += uploads
                continue
            if self._open is None:
                self._open = Batch(now, seq, s.batch_max_bytes, s.batch_max_payloads, s.compression)
                self._open_deadline = time.monotonic() + s.batch_max_age
            self._open.add(chunk, payloads, now)
            self._open_waiters += seq in self._upload_waiters
            if self._open.full:
                self._close_open()
        if self._open is not None:
            self._open.encode()

    def _withdraw(self, seq: int) -> None:
        """Chunk `seq`'s spool write failed and its client got 503: it is not delivered."""
        metrics.PAYLOADS_WITHDRAWN.inc(self.spool.refused.pop(seq))
        self._upload_waiters.pop(seq, None)  # answered already

    def _close_open(self) -> None:
        if self._open is not None and self._open.payloads:
            assert self.keys is not None
            self._handoff.append(self._open.close(self.keys))
            metrics.BATCHES_CLOSED.inc()
        self._open = None
        self._open_waiters = 0

    async def _hand_over(self) -> None:
        delivery = self.delivery
        while self._handoff:
            upload = self._handoff[0]
            if upload.marker is not None and not await self._record_batch(upload):
                self._handoff.popleft()  # every chunk of it was withdrawn
                continue
            if delivery.parking:
                delivery.park(upload)
            elif self.per_payload:
                await self.jobs.aput(upload)  # small objects: backpressure, not the backlog
            else:
                try:
                    self.jobs.put_nowait(upload)
                except QueueFull:  # the workers are busy: wait on disk, not in memory
                    delivery.park(upload)
            self._handoff.popleft()

    async def _record_batch(self, upload: Upload) -> bool:
        """Make the batch's boundaries durable before its upload may begin.

        False if nothing is left of it: each of its chunks was withdrawn.
        """
        spool = self.spool
        await spool.settled()  # each of its chunks is now durable or refused
        if spool.refused and (late := [s for s in upload.seqs if s in spool.refused]):
            for seq in late:  # framed before its write failed: leave it out
                self._withdraw(seq)
            upload.excluded |= frozenset(late)
            upload.unload()  # its body holds them: it is read back from the spool instead
            if len(upload.excluded) == len(upload.seqs):
                return False
        marker = Marker(
            upload.seqs.start, upload.seqs.stop - 1, upload.key, upload.first, upload.excluded
        )
        await spool.wait(
            spool.append(BATCH, marker.first, upload.first, marker.pack()), refuses=False
        )
        return True

    # --- completion ---------------------------------------------------------------

    def _done(self, upload: Upload, uploaded: bool) -> None:
        """`upload` is stored (sink or dead letter): free its spool records, answer waiters."""
        if not self._parts_left and not self._upload_waiters:  # nothing to settle per seq
            self.spool.stored(upload.seqs, marker=upload.marker)
            return
        finished = []
        for seq in upload.seqs:
            left = self._parts_left.get(seq)
            if left is not None and left > 1:
                self._parts_left[seq] = left - 1
                continue
            self._parts_left.pop(seq, None)
            finished.append(seq)
            if (fut := self._upload_waiters.pop(seq, None)) is not None and not fut.done():
                fut.set_result(uploaded)
        self.spool.stored(finished, marker=upload.marker)

    def _unexpected(self, upload: Upload, exc: BaseException) -> None:
        # Delivery.store handles its own errors; this is the pool's safety net for a bug in
        # it: the object waits in the backlog (its bytes in the spool) and is tried again.
        self.delivery.park(upload)

    # --- metrics ----------------------------------------------------------------

    def update_gauges(self) -> None:
        m = metrics
        m.QUEUE_REQUESTS.set(self.intake.qsize())
        m.QUEUE_PAYLOADS.set(self._queued_payloads)
        m.QUEUE_BYTES.set(self.intake.nbytes)
        m.SPOOL_BYTES.set(self.spool.on_disk)
        m.SPOOL_SEGMENTS.set(len(self.spool.segments))
        m.PAYLOADS_HELD.set(self.held())
        backlog = self.delivery.backlog
        m.BACKLOG_OBJECTS.set(len(backlog))
        m.BACKLOG_BYTES.set(sum(u.raw_size for u in backlog))
        oldest = self.delivery.oldest()
        m.UNSTORED_OLDEST.set(0 if oldest is None else max(0.0, time.time() - oldest))
        m.SINK_UP.set(0 if self.delivery.failing else 1)

    def held(self) -> int:
        """Payloads this process took (or replayed) and has not stored or withdrawn."""
        m = metrics
        taken = m.total(m.PAYLOADS_ACCEPTED) + m.total(m.PAYLOADS_REPLAYED)
        gone = m.total(m.PAYLOADS_UPLOADED) + m.total(m.PAYLOADS_DEAD)
        return int(taken - gone - m.total(m.PAYLOADS_WITHDRAWN))

    # --- shutdown ---------------------------------------------------------------

    async def stop(self, timeout: float) -> None:
        """Drain everything to the sink within `timeout`; what is left stays in the spool."""
        self.intake.close()
        assert self._batcher is not None
        drained = False
        try:
            async with asyncio.timeout(timeout):
                await self._batcher
                drained = await self._drained()
        except TimeoutError:
            log.error("shutdown deadline (%.1fs) passed before everything was stored", timeout)
        if drained:
            await self.pool.stop(drain=True)  # type: ignore[misc]
        else:
            await self._abandon()
        await self.delivery.close()
        self._sealer.shutdown(wait=True)
        await self.spool.close()
        if (held := self.held()) > 0:
            log.warning(
                "%d accepted payloads stay in the spool %s: the next start on it delivers them",
                held,
                self.spool.root,
            )

    async def _drained(self) -> bool:
        """Wait until nothing waits to be stored (True), or only what a failing sink holds up."""
        delivery = self.delivery
        while not delivery.idle:
            if delivery.failing and not delivery.in_flight and not self.jobs.qsize():
                log.error("the sink is failing (%s): not waiting for it", delivery.last_error)
                return False
            await asyncio.sleep(DRAIN_POLL)
        return True

    async def _abandon(self) -> None:
        """Stop batching and uploading now; the spool keeps everything not yet stored."""
        assert self._batcher is not None
        self._batcher.cancel()
        await asyncio.gather(self._batcher, return_exceptions=True)
        await self.pool.abort()
