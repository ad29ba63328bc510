"""The payload's road from an accepted request to the sink, wired together.

    submit()  ->  spool: append the chunk (fsynced by group commit)    [ack durable]
              ->  Batcher (batcher.py): the intake, the open batch, closed objects
              ->  jobs: RingQueue of Upload (a few slots), or, while they are full or
                  the sink fails, the delivery backlog (the bytes stay in the spool)
              ->  WorkerPool -> Delivery.store (delivery.py): sink.put, the retry
                  policy, dead letters
              ->  sink, or the dead-letter directory               [ack uploaded]
              ->  Completion: the spool frees the chunks, waiting clients are answered

Every chunk gets a sequence number when accepted; the numbers name the objects (see
KeyMaker). A start first replays what an earlier run left in the spool (replay.py).

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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from fastingest import metrics
from fastingest.batcher import Batcher
from fastingest.batching import KeyMaker, Upload
from fastingest.config import Settings, usable_cpus
from fastingest.deadletter import DeadLetter
from fastingest.delivery import Completion, Delivery
from fastingest.pool import WorkerPool
from fastingest.queue import RingQueue
from fastingest.replay import replay
from fastingest.sinks import Sink
from fastingest.spool import Spool, SpoolError
from fastingest.spool_records import BATCH, DATA

log = logging.getLogger("fastingest.pipeline")

# Added niceness of the threads that seal what the batcher did not (batches read back
# from the spool, large per-payload objects), so that they leave most of a shared core
# to the event loop.
SEAL_NICE = 4
JOBS_WAITING = 4  # closed batches queued for the upload workers
DRAIN_POLL = 0.05  # seconds between looks at the delivery while a stop drains it
# Before an object whose store hit a bug is tried again: a bug that fails every time then
# costs a log line per pause, not a core. A stop meanwhile leaves it in the spool.
BUG_RETRY_SECONDS = 5.0


def _lower_priority() -> None:
    """Nice the calling thread (Linux schedules threads one by one); elsewhere do nothing."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SEAL_NICE)


class Pipeline:
    def __init__(self, settings: Settings, sink: Sink) -> None:
        self.settings = settings
        self.sink = sink
        self.spool = Spool(settings.spool_path, settings.spool_max_bytes)
        # A few closed batches waiting for a worker keep the workers busy; the rest wait in
        # the delivery backlog, their bytes in the spool, not in memory.
        self.jobs: RingQueue[Upload] = RingQueue(min(settings.max_workers, JOBS_WAITING))
        # Batches come sealed from the batcher; what it did not seal (see SEAL_NICE) is
        # sealed here, one thread per CPU (zlib and zstd drop the GIL).
        seal_threads = usable_cpus()
        self._sealer = ThreadPoolExecutor(
            seal_threads, thread_name_prefix="fastingest-seal", initializer=_lower_priority
        )
        self.dead_letter = DeadLetter(settings.dead_letter_path)
        self.completion = Completion(self.spool)
        self.delivery = Delivery(
            sink,
            self.spool,
            self.dead_letter,
            self.jobs,
            self.completion.done,
            window=settings.delivery_window,
            retry_base=settings.retry_base_delay,
            retry_max=settings.retry_max_delay,
            sealer=self._sealer,
            seal_threads=seal_threads,
        )
        self.batcher = Batcher(settings, self.spool, self.delivery, self.jobs, self.completion)
        self.intake = self.batcher.intake
        self.pool: WorkerPool[Upload] = WorkerPool(
            settings.max_workers,
            self.delivery.store,
            self.jobs,
            on_error=self._unexpected,
            name="fastingest-upload",
        )
        self._next_seq = 0  # given to the next accepted chunk
        self._batching: asyncio.Task[None] | None = None
        self._accepted = metrics.tally(metrics.PAYLOADS_ACCEPTED)

    async def start(self) -> None:
        """Open the spool, start the workers, and put back what an earlier run left."""
        records = self.spool.open()
        partitioner = self.batcher.partitioner
        specs = self.spool.partitionings(partitioner.spec if partitioner else "", records)
        keys = KeyMaker(self.sink.prefix, self.spool.id, self.spool.epoch)
        seqs = [r.seq for r in records] + [r.batch.last for r in records if r.kind == BATCH]
        self._next_seq = max(seqs, default=-1) + 1
        self._batching = self.batcher.start(keys, self._next_seq)
        metrics.SINK_UP.set(1)
        self.delivery.start()
        self.pool.start()
        if records:
            await replay(records, self.batcher, specs)

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
        now = time.time()
        self.batcher.put(chunk, payloads, now)
        self._accepted.n += payloads
        seq = self._next_seq
        self._next_seq += 1
        stored = self.completion.wait(seq) if want_upload else None
        return self.spool.append(DATA, seq, now, chunk, payloads, sync=sync), stored

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

    def _unexpected(self, upload: Upload, exc: BaseException) -> None:
        # Delivery.store handles its own errors; this is the pool's safety net for a bug in
        # it: the object waits (its bytes in the spool), then joins the backlog again.
        asyncio.get_running_loop().call_later(BUG_RETRY_SECONDS, self.delivery.park, upload)

    # --- metrics ----------------------------------------------------------------

    def update_gauges(self) -> None:
        m = metrics
        m.QUEUE_REQUESTS.set(self.intake.qsize())
        m.QUEUE_PAYLOADS.set(self.batcher.queued_payloads)
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
        assert self._batching is not None
        drained = False
        try:
            async with asyncio.timeout(timeout):
                await self._batching
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
        assert self._batching is not None
        self._batching.cancel()
        await asyncio.gather(self._batching, return_exceptions=True)
        await self.pool.abort()
