"""The payload's road from an accepted request to the sink.

    submit()  ->  spool: append the chunk (fsynced by group commit)    [ack durable]
              ->  intake: RingQueue of NDJSON chunks (bounded by count and bytes),
                  each chunk's payload count in a deque alongside
              ->  batcher task: chunks -> open Batch (compressed as it grows) -> Upload
                  (or one Upload per payload); a closing batch is recorded in the spool
                  before its upload
              ->  jobs: RingQueue of Upload (one slot per worker: backpressure to the batcher)
              ->  WorkerPool: sink.put with retries
              ->  sink, or the dead-letter directory after the last attempt   [ack uploaded]
              ->  spool: chunks stored, segments freed

Every chunk gets a sequence number when accepted. The intake is FIFO with one
producer (the event loop) and one consumer (the batcher), so the batcher knows
each chunk's number by counting; the numbers name the objects (see KeyMaker).

Everything the pipeline holds is reachable from it (intake, the open batch,
hand-offs, jobs, in-flight uploads), so a shutdown that runs out of time
dead-letters all of it instead of dropping it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
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
from fastingest.errors import QueueClosed
from fastingest.pool import WorkerPool
from fastingest.queue import RingQueue
from fastingest.sinks import Sink, SinkError
from fastingest.spool import BATCH, DATA, LAST_SEQ, Record, Spool, SpoolError

log = logging.getLogger("fastingest.pipeline")

DRAIN_CHUNKS = 1024  # chunks the batcher takes from the intake per round
JOBS_WAITING = 4  # closed batches queued for the upload workers
SEAL_IN_THREAD_BYTES = 64 * 1024  # smaller bodies compress faster than a thread hop
# Added niceness of the threads that seal what the batcher did not (batches rebuilt by a
# spool replay, large per-payload objects), so that they leave most of a shared core to
# the event loop.
SEAL_NICE = 4
MARKER_RETRY = 0.5  # seconds between tries to record a closing batch on a failing disk


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
        # A few closed batches waiting for a worker keep the workers busy; more would only
        # hold memory (each is up to --batch-max-bytes) while the sink is slow.
        self.jobs: RingQueue[Upload] = RingQueue(min(settings.max_workers, JOBS_WAITING))
        # Batches come sealed from the batcher; what it did not seal (see SEAL_NICE) is
        # sealed here, one thread per CPU (zlib and zstd drop the GIL).
        self._sealer = ThreadPoolExecutor(
            usable_cpus(), thread_name_prefix="fastingest-seal", initializer=_lower_priority
        )
        self.pool: WorkerPool[Upload] = WorkerPool(
            settings.max_workers,
            self._store,
            self.jobs,
            on_error=self._unexpected,
            name="fastingest-upload",
        )
        self.dead_letter = DeadLetter(settings.dead_letter_path)
        self.keys: KeyMaker | None = None  # known once the spool is open
        self._next_seq = 0  # given to the next accepted chunk
        self._taken_seq = 0  # of the next chunk the batcher takes from the intake
        self._open: Batch | None = None
        self._open_deadline = 0.0  # monotonic time the open batch must close by
        self._open_waiters = 0  # requests with ack "uploaded" whose chunk is in the open batch
        self._queued_payloads = 0  # payloads in the intake (for the metric)
        self._handoff: deque[Upload] = deque()  # closed, not yet in `jobs`
        self._in_flight: dict[int, Upload] = {}  # id -> upload being stored by a worker
        self._parts_left: dict[int, int] = {}  # per-payload mode: seq -> objects to go
        self._upload_waiters: dict[int, asyncio.Future[bool]] = {}  # seq -> ack "uploaded"
        self._batcher: asyncio.Task[None] | None = None
        self._accepted = metrics.tally(metrics.PAYLOADS_ACCEPTED)

    # --- start ------------------------------------------------------------------

    async def start(self) -> None:
        """Open the spool, start the workers, and put back what an earlier run left."""
        records = self.spool.open()
        self.keys = KeyMaker(self.sink.prefix, self.spool.id, self.spool.epoch)
        seqs = [r.seq for r in records] + [r.batch[0] for r in records if r.kind == BATCH]
        self._next_seq = self._taken_seq = max(seqs, default=-1) + 1
        self._batcher = asyncio.get_running_loop().create_task(
            self._batch_loop(), name="fastingest-batcher"
        )
        self.pool.start()
        if records:
            await self._replay(records)

    async def _replay(self, records: list[Record]) -> None:
        """Rebuild the objects a crashed run may have uploaded (same keys), requeue the rest."""
        assert self.keys is not None
        data = {r.seq: r for r in records if r.kind == DATA}
        covered: set[int] = set()
        for m in (r for r in records if r.kind == BATCH):
            last, key = m.batch
            seqs = range(m.seq, last + 1)
            covered.update(seqs)
            if not all(s in data for s in seqs):
                # Part of it is gone: its segment was freed because the batch was stored.
                self.spool.stored([s for s in seqs if s in data], marker=m.seq)
                continue
            chunks = [data[s].body for s in seqs]
            compression = next((c for c, ext in EXTENSIONS.items() if key.endswith(ext)), "none")
            upload = Upload(
                key,
                chunks,
                sum(len(c) for c in chunks),
                sum(c.count(b"\n") for c in chunks),
                m.time,
                max(data[s].time for s in seqs),
                CONTENT_TYPES[compression],
                seqs,
                m.seq,
                compression,
            )
            await self._replayed(upload)
        requeue = [data[s] for s in sorted(data) if s not in covered]
        if self.per_payload:
            for r in requeue:
                uploads = per_payload(r.body, r.seq, self.keys, r.time, r.epoch)
                if len(uploads) > 1:
                    self._parts_left[r.seq] = len(uploads)
                for upload in uploads:
                    await self._replayed(upload)
        else:
            # Never part of a recorded batch, so never uploaded: take them in again.
            ticket = 0
            for r in requeue:
                payloads = r.body.count(b"\n")
                self._counts.append(payloads)  # first: the batcher may take the chunk at once
                self._queued_payloads += payloads
                await self.intake.aput(r.body)
                ticket = self._spool_data(r.body, payloads)
                metrics.PAYLOADS_REPLAYED.inc(payloads)
            if requeue:
                await self.spool.wait(ticket)
                self.spool.stored([r.seq for r in requeue])  # the copies are durable now
        log.info(
            "replayed the spool: %d chunks, %d damaged tails quarantined",
            len(data),
            self.spool.damaged,
        )

    async def _replayed(self, upload: Upload) -> None:
        metrics.PAYLOADS_REPLAYED.inc(upload.payloads)
        await self.jobs.aput(upload)

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
        for chunk in chunks:
            seq = self._taken_seq
            self._taken_seq += 1
            payloads = counts.popleft()
            self._queued_payloads -= payloads
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

    def _close_open(self) -> None:
        if self._open is not None and self._open.payloads:
            assert self.keys is not None
            self._handoff.append(self._open.close(self.keys))
            metrics.BATCHES_CLOSED.inc()
        self._open = None
        self._open_waiters = 0

    async def _hand_over(self) -> None:
        while self._handoff:
            upload = self._handoff[0]
            if upload.marker is not None:
                await self._record_batch(upload)
            await self.jobs.aput(upload)
            self._handoff.popleft()

    async def _record_batch(self, upload: Upload) -> None:
        """Make the batch's boundaries durable before its upload may begin."""
        body = LAST_SEQ.pack(upload.seqs.stop - 1) + upload.key.encode()
        while True:
            try:
                await self.spool.wait(
                    self.spool.append(BATCH, upload.seqs.start, upload.first, body)
                )
                return
            except SpoolError:
                await asyncio.sleep(MARKER_RETRY)

    # --- workers ----------------------------------------------------------------

    async def _store(self, upload: Upload) -> None:
        """Seal and store one object, retrying; dead-letter it after the last attempt."""
        self._in_flight[id(upload)] = upload
        s = self.settings
        attempt = 0
        started = time.monotonic()
        try:
            if not upload.body:  # a batch comes sealed from the batcher
                if upload.raw_size > SEAL_IN_THREAD_BYTES:
                    await asyncio.get_running_loop().run_in_executor(self._sealer, upload.seal)
                else:
                    upload.seal()
            while True:
                attempt += 1
                try:
                    await self.sink.put(upload)
                    break
                except SinkError as exc:
                    if not exc.retryable or attempt >= s.upload_attempts:
                        raise
                    metrics.UPLOAD_RETRIES.labels(exc.kind).inc()
                    # Full jitter: spreads a fleet's retries after a store hiccup.
                    delay = random.uniform(
                        0, min(s.retry_max, s.retry_base_delay * 2 ** (attempt - 1))
                    )
                    log.warning(
                        "upload %s failed (%s), attempt %d/%d, retrying in %.2fs",
                        upload.key,
                        exc,
                        attempt,
                        s.upload_attempts,
                        delay,
                    )
                    await asyncio.sleep(delay)
        except asyncio.CancelledError:
            raise  # still in _in_flight: the shutdown path dead-letters it
        except Exception as exc:
            self._give_up(upload, exc, attempt)
            return
        del self._in_flight[id(upload)]
        metrics.UPLOAD_SECONDS.observe(time.monotonic() - started)
        metrics.OBJECTS_UPLOADED.inc()
        metrics.PAYLOADS_UPLOADED.inc(upload.payloads)
        metrics.BYTES_OUT.inc(len(upload.body))
        self._done(upload, True)

    def _give_up(self, upload: Upload, exc: BaseException | str, attempts: int) -> None:
        upload.seal()
        self.dead_letter.store(upload, exc, attempts)
        self._in_flight.pop(id(upload), None)
        self._done(upload, False)

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
        # _store handles its own errors; this is the pool's safety net for a bug in it.
        self._give_up(upload, exc, 0)

    # --- metrics ----------------------------------------------------------------

    def update_gauges(self) -> None:
        m = metrics
        m.QUEUE_REQUESTS.set(self.intake.qsize())
        m.QUEUE_PAYLOADS.set(self._queued_payloads)
        m.QUEUE_BYTES.set(self.intake.nbytes)
        m.SPOOL_BYTES.set(self.spool.on_disk)
        m.SPOOL_SEGMENTS.set(len(self.spool.segments))
        held = m.total(m.PAYLOADS_ACCEPTED) + m.total(m.PAYLOADS_REPLAYED)
        m.PAYLOADS_HELD.set(held - m.total(m.PAYLOADS_UPLOADED) - m.total(m.PAYLOADS_DEAD))

    # --- shutdown ---------------------------------------------------------------

    async def stop(self, timeout: float) -> None:
        """Drain everything to the sink within `timeout`, then dead-letter what is left."""
        self.intake.close()
        assert self._batcher is not None
        try:
            async with asyncio.timeout(timeout):
                await self._batcher
                await self.pool.stop(drain=True)  # type: ignore[misc]
        except TimeoutError:
            log.error("shutdown deadline (%.1fs) passed: dead-lettering what is left", timeout)
            await self._dead_letter_everything()
        self._sealer.shutdown(wait=True)
        await self.spool.close()

    async def _dead_letter_everything(self) -> None:
        assert self._batcher is not None
        self._batcher.cancel()
        await asyncio.gather(self._batcher, return_exceptions=True)
        left = await self.pool.abort()
        left += list(self._in_flight.values())
        while self.jobs.qsize():
            left += self.jobs.get_many(DRAIN_CHUNKS)
        while True:  # frame what is still queued exactly as the batcher would have
            try:
                self._frame(self.intake.get_many(DRAIN_CHUNKS))
            except QueueClosed:
                break
        self._close_open()
        left += self._handoff
        self._handoff.clear()
        for upload in left:
            self._give_up(upload, "shutdown deadline passed before upload", 0)
        self._in_flight.clear()
