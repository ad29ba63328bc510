"""The batcher: accepted request chunks -> closed objects, handed to delivery.

    intake (RingQueue of NDJSON chunks, bounded by count and bytes)
      -> open Batch (compressed as it grows), or one Upload per payload
      -> a closing batch's boundaries recorded in the spool (its Marker)
      -> jobs (a few slots for the upload workers), or the delivery backlog while
         they are busy or the sink fails (the bytes stay in the spool)

One task takes the chunks in acceptance order, so it knows each chunk's sequence
number by counting. A batch closes on its byte or payload threshold, on its age, or
as soon as the intake runs dry while a client waits for it (ack ``uploaded``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from fastingest import metrics
from fastingest.batching import Batch, KeyMaker, Upload, per_payload
from fastingest.config import Settings
from fastingest.delivery import Completion, Delivery
from fastingest.errors import QueueClosed, QueueFull
from fastingest.queue import RingQueue
from fastingest.spool import Spool
from fastingest.spool_records import Marker

DRAIN_CHUNKS = 1024  # chunks the batcher takes from the intake per round


class Batcher:
    """Owns the intake and the open batch; `run()` is its task."""

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        delivery: Delivery,
        jobs: RingQueue[Upload],
        completion: Completion,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.delivery = delivery
        self.jobs = jobs
        self.completion = completion
        self.per_payload = settings.mode == "per-payload"
        self.intake: RingQueue[bytes] = RingQueue(settings.max_queue, settings.max_queue_bytes)
        # The payload count of each chunk in the intake, in the same order: known when the
        # chunk is accepted, so the batcher need not count its lines again.
        self._counts: deque[int] = deque()
        self.queued_payloads = 0  # in the intake (for the metric)
        self.keys: KeyMaker | None = None  # known once the spool is open
        self._taken_seq = 0  # of the next chunk taken from the intake
        self._open: Batch | None = None
        self._open_deadline = 0.0  # monotonic time the open batch must close by
        self._open_waiters = 0  # chunks in the open batch whose clients wait for "uploaded"
        self._handoff: deque[Upload] = deque()  # closed, not yet in `jobs` or the backlog

    def start(self, keys: KeyMaker, next_seq: int) -> asyncio.Task[None]:
        """Begin with chunk `next_seq` (the first after what the spool holds)."""
        self.keys = keys
        self._taken_seq = next_seq
        return asyncio.get_running_loop().create_task(self.run(), name="fastingest-batcher")

    def put(self, chunk: bytes, payloads: int) -> None:
        """Queue one request's chunk; raises QueueFull or QueueClosed."""
        self.intake.put_nowait(chunk)
        self._counts.append(payloads)
        self.queued_payloads += payloads

    async def run(self) -> None:
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
            self.queued_payloads -= payloads
            if refused and seq in refused:  # answered 503: the client sends it again
                self._withdraw(seq)
                if self._open is not None:
                    self._open.skip(seq)
                continue
            if self.per_payload:
                uploads = per_payload(chunk, seq, self.keys, now)
                self.completion.split(seq, len(uploads))
                self._handoff += uploads
                continue
            if self._open is None:
                self._open = Batch(now, seq, s.batch_max_bytes, s.batch_max_payloads, s.compression)
                self._open_deadline = time.monotonic() + s.batch_max_age
            self._open.add(chunk, payloads, now)
            self._open_waiters += self.completion.waits(seq)
            if self._open.full:
                self._close_open()
        if self._open is not None:
            self._open.encode()

    def _withdraw(self, seq: int) -> None:
        """Chunk `seq`'s spool write failed and its client got 503: it is not delivered."""
        metrics.PAYLOADS_WITHDRAWN.inc(self.spool.refused.pop(seq))
        self.completion.forget(seq)  # answered already

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
            if upload.marker is not None and not await self.record(upload):
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

    async def record(self, upload: Upload) -> bool:
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
        seqs = upload.seqs
        marker = Marker(
            seqs.start, seqs.stop - 1, upload.key, upload.compression, upload.first, upload.excluded
        )
        await spool.wait(spool.append_marker(marker), refuses=False)
        return True
