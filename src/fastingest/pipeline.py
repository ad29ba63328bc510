"""The payload's road from an accepted request to the sink.

    submit()  ->  intake: RingQueue of NDJSON chunks (bounded by count and bytes)
              ->  batcher task: chunks -> open Batch -> Upload  (or one Upload per payload)
              ->  jobs: RingQueue of Upload (one slot per worker: backpressure to the batcher)
              ->  WorkerPool: seal (compress, in a thread) -> sink.put with retries
              ->  sink, or the dead-letter directory after the last attempt

Everything the pipeline holds is always reachable from it (intake, the open
batch, hand-offs, jobs, in-flight uploads), so a shutdown that runs out of time
can dead-letter all of it instead of dropping it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field

from fastingest.batching import Batch, KeyMaker, Upload, compressor, per_payload
from fastingest.config import Settings
from fastingest.deadletter import DeadLetter
from fastingest.errors import QueueClosed
from fastingest.pool import WorkerPool
from fastingest.queue import RingQueue
from fastingest.sinks import Sink, SinkError

log = logging.getLogger("fastingest.pipeline")

DRAIN_CHUNKS = 1024  # chunks the batcher takes from the intake per round
SEAL_IN_THREAD_BYTES = 64 * 1024  # smaller bodies compress faster than a thread hop


@dataclass
class Counters:
    """Running totals; accepted == uploaded + dead-lettered + still held, always."""

    accepted_requests: int = 0
    accepted_payloads: int = 0
    accepted_bytes: int = 0
    overloaded_requests: int = 0
    uploaded_objects: int = 0
    uploaded_payloads: int = 0
    uploaded_bytes: int = 0
    retries: Counter[str] = field(default_factory=Counter)


class Pipeline:
    def __init__(self, settings: Settings, sink: Sink) -> None:
        self.settings = settings
        self.sink = sink
        self.keys = KeyMaker(sink.prefix)
        self.per_payload = settings.mode == "per-payload"
        self.compress = compressor("none" if self.per_payload else settings.compression)
        self.intake: RingQueue[bytes] = RingQueue(settings.max_queue, settings.max_queue_bytes)
        self.jobs: RingQueue[Upload] = RingQueue(settings.max_workers)
        self.pool: WorkerPool[Upload] = WorkerPool(
            settings.max_workers,
            self._store,
            self.jobs,
            on_error=self._unexpected,
            name="fastingest-upload",
        )
        self.dead_letter = DeadLetter(settings.dead_letter_path)
        self.counters = Counters()
        self._open: Batch | None = None
        self._open_deadline = 0.0  # monotonic time the open batch must close by
        self._handoff: list[Upload] = []  # closed, not yet in `jobs`
        self._in_flight: dict[int, Upload] = {}  # id -> upload being stored by a worker
        self._batcher: asyncio.Task[None] | None = None

    # --- intake -----------------------------------------------------------------

    def submit(self, chunk: bytes, payloads: int) -> None:
        """Queue one request's payloads; raises QueueFull or QueueClosed, taking nothing."""
        self.intake.put_nowait(chunk)
        c = self.counters
        c.accepted_requests += 1
        c.accepted_payloads += payloads
        c.accepted_bytes += len(chunk)

    @property
    def accepting(self) -> bool:
        return not self.intake.closed

    def start(self) -> None:
        self._batcher = asyncio.get_running_loop().create_task(
            self._batch_loop(), name="fastingest-batcher"
        )
        self.pool.start()

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
            await self._hand_over()
        self._close_open()
        await self._hand_over()

    async def _wait_for_chunks(self) -> list[bytes]:
        if self._open is None:
            return await self.intake.aget_many(DRAIN_CHUNKS)
        left = self._open_deadline - time.monotonic()
        if left <= 0:
            return []
        try:
            return await asyncio.wait_for(self.intake.aget_many(DRAIN_CHUNKS), left)
        except TimeoutError:
            return []

    def _frame(self, chunks: list[bytes]) -> None:
        now = time.time()
        if self.per_payload:
            for chunk in chunks:
                self._handoff += per_payload(chunk, self.keys, now)
            return
        s = self.settings
        for chunk in chunks:
            if self._open is None:
                self._open = Batch(now, s.batch_max_bytes, s.batch_max_payloads)
                self._open_deadline = time.monotonic() + s.batch_max_age
            self._open.add(chunk, now)
            if self._open.full:
                self._close_open()

    def _close_open(self) -> None:
        if self._open is not None and self._open.payloads:
            self._handoff.append(self._open.close(self.keys, self.settings.compression))
        self._open = None

    async def _hand_over(self) -> None:
        while self._handoff:
            await self.jobs.aput(self._handoff[0])
            self._handoff.pop(0)

    # --- workers ----------------------------------------------------------------

    async def _store(self, upload: Upload) -> None:
        """Seal and store one object, retrying; dead-letter it after the last attempt."""
        self._in_flight[id(upload)] = upload
        s = self.settings
        attempt = 0
        try:
            if upload.raw_size > SEAL_IN_THREAD_BYTES:
                await asyncio.to_thread(upload.seal, self.compress)
            else:
                upload.seal(self.compress)
            while True:
                attempt += 1
                try:
                    await self.sink.put(upload)
                    break
                except SinkError as exc:
                    if not exc.retryable or attempt >= s.upload_attempts:
                        raise
                    self.counters.retries[exc.kind] += 1
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
        c = self.counters
        c.uploaded_objects += 1
        c.uploaded_payloads += upload.payloads
        c.uploaded_bytes += len(upload.body)

    def _give_up(self, upload: Upload, exc: BaseException | str, attempts: int) -> None:
        if not upload.body:
            upload.seal(self.compress)
        self.dead_letter.store(upload, exc, attempts)
        self._in_flight.pop(id(upload), None)

    def _unexpected(self, upload: Upload, exc: BaseException) -> None:
        # _store handles its own errors; this is the pool's safety net for a bug in it.
        self._give_up(upload, exc, 0)

    # --- shutdown ---------------------------------------------------------------

    async def stop(self, timeout: float) -> None:
        """Drain everything to the sink within `timeout`, then dead-letter what is left."""
        self.intake.close()
        assert self._batcher is not None
        try:
            async with asyncio.timeout(timeout):
                await self._batcher
                await self.pool.stop(drain=True)  # type: ignore[misc]
            return
        except TimeoutError:
            log.error("shutdown deadline (%.1fs) passed: dead-lettering what is left", timeout)
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
        self._handoff = []
        for upload in left:
            self._give_up(upload, "shutdown deadline passed before upload", 0)
        self._in_flight.clear()

    def held_payloads(self) -> int:
        """Payloads accepted but neither uploaded nor dead-lettered yet."""
        c = self.counters
        return c.accepted_payloads - c.uploaded_payloads - self.dead_letter.payloads
