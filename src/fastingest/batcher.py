"""The batcher: accepted request chunks -> closed objects, handed to delivery.

    intake (RingQueue of NDJSON chunks, bounded by count and bytes)
      -> open Batch (compressed as it grows), or one Upload per payload
      -> a closing batch's boundaries recorded in the spool (its Marker)
      -> jobs (a few slots for the upload workers), or the delivery backlog while
         they are busy or the sink fails (the bytes stay in the spool)

One task takes the chunks in acceptance order, so it knows each chunk's sequence
number by counting. A batch closes on its byte or payload threshold, on its age, or
as soon as the intake runs dry while a client waits for it (ack ``uploaded``).

With ``--partition-by`` or ``--time-field`` each chunk's payloads are split by
partition (partitions.py), and each partition has its own open batch. At most
``--max-open-partitions`` are open, holding at most ``OPEN_BATCHES`` batches' worth
of bytes together; past either, the least recently written partition's batch closes
early (more, smaller objects, counted), so no stream of distinct values can exhaust
memory. A chunk split over k partitions is settled once all k objects are stored.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque

from fastingest import metrics
from fastingest.batching import Batch, KeyMaker, Upload, per_payload
from fastingest.config import Settings
from fastingest.delivery import Completion, Delivery
from fastingest.errors import QueueClosed, QueueFull
from fastingest.parquet import ParquetWriter
from fastingest.partitions import Partitioner
from fastingest.queue import RingQueue
from fastingest.spool import Spool
from fastingest.spool_records import Marker

DRAIN_CHUNKS = 1024  # chunks the batcher takes from the intake per round
OPEN_BATCHES = 4  # partitions' open batches hold this many --batch-max-bytes at most


def parquet_writer(settings: Settings, compression: str | None = None) -> ParquetWriter:
    from fastingest.parquet import load_schema

    schema = load_schema(settings.schema) if settings.schema is not None else None
    return ParquetWriter(compression or settings.compression, schema)


def partitioner(settings: Settings) -> Partitioner | None:
    if not settings.partition_by and settings.time_field is None:
        return None
    unique = settings.duplicate_keys == "refuse"
    return Partitioner(settings.partition_by, settings.time_field, unique)


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
        self.writer = parquet_writer(settings) if settings.format == "parquet" else None
        self.partitioner = partitioner(settings)
        self.intake: RingQueue[bytes] = RingQueue(settings.max_queue, settings.max_queue_bytes)
        # The payload count and arrival time of each chunk in the intake, in the same order:
        # known when the chunk is accepted, so the batcher need not count its lines again.
        self._counts: deque[tuple[int, float]] = deque()
        self.queued_payloads = 0  # in the intake (for the metric)
        self.keys: KeyMaker | None = None  # known once the spool is open
        self._taken_seq = 0  # of the next chunk taken from the intake
        self._open: Batch | None = None
        # Partitioned: each partition's open batch, least recently written first.
        self._partitions: OrderedDict[str, Batch] = OrderedDict()
        self._partition_bytes = 0  # in their open batches
        self._withdrawn: set[int] = set()  # refused chunks other partitions' batches may hold
        self._handoff: deque[Upload] = deque()  # closed, not yet in `jobs` or the backlog

    def start(self, keys: KeyMaker, next_seq: int) -> asyncio.Task[None]:
        """Begin with chunk `next_seq` (the first after what the spool holds)."""
        self.keys = keys
        self._taken_seq = next_seq
        return asyncio.get_running_loop().create_task(self.run(), name="fastingest-batcher")

    def put(self, chunk: bytes, payloads: int, received: float) -> None:
        """Queue one request's chunk (`received`: its spool record's time); raises QueueFull
        or QueueClosed."""
        self.intake.put_nowait(chunk)
        self._counts.append((payloads, received))
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
                self._frame(chunks)  # no await: every chunk lands in an open batch or _handoff
                if self._partitions:
                    self._close_partitions(due=True)
            elif self._open is not None:  # the open batch reached its age
                self._close_open()
            elif self._partitions:  # one reached its age, or the intake ran dry for a waiter
                self._close_partitions(due=True, waited=True)
            metrics.flush()  # before any of these chunks can be counted as uploaded
            await self._hand_over()
        self._close_open()
        self._close_partitions()
        await self._hand_over()

    async def _wait_for_chunks(self) -> list[bytes]:
        open_ = [self._open] if self._open is not None else list(self._partitions.values())
        if not open_:
            return await self.intake.aget_many(DRAIN_CHUNKS)
        if any(b.waiters for b in open_):
            return []  # a client waits for an open batch: close it now the intake is dry
        left = min(b.closes_at for b in open_) - time.monotonic()
        if left <= 0:
            return []
        try:
            return await asyncio.wait_for(self.intake.aget_many(DRAIN_CHUNKS), left)
        except TimeoutError:
            return []

    def _frame(self, chunks: list[bytes]) -> None:
        assert self.keys is not None
        now = time.time()
        counts = self._counts
        refused = self.spool.refused
        for chunk in chunks:
            seq = self._taken_seq
            self._taken_seq += 1
            payloads, received = counts.popleft()
            self.queued_payloads -= payloads
            if refused and seq in refused:  # answered 503: the client sends it again
                self._withdraw(seq)
                for batch in (self._open, *self._partitions.values()):
                    if batch is not None:
                        batch.skip(seq)
                continue
            if self.partitioner is not None:
                self._frame_partitions(chunk, seq, received, now)
                continue
            if self.per_payload:
                uploads = per_payload(chunk, seq, self.keys, now)
                self.completion.split(seq, len(uploads))
                self._handoff += uploads
                continue
            if self._open is None:
                self._open = self._new_batch(seq, now)
            self._open.add(chunk, payloads, now)
            self._open.waiters += self.completion.waits(seq)
            if self._open.full:
                self._close_open()
        if self._open is not None:
            self._open.encode()

    def _new_batch(self, seq: int, now: float, partition: str | None = None) -> Batch:
        """A batch opening with chunk `seq`: the one open batch, or `partition`'s."""
        s = self.settings
        return Batch(
            now,
            seq,
            s.batch_max_bytes,
            s.batch_max_payloads,
            s.compression,
            self.writer,
            partition or "",
            self.partitioner if partition is not None else None,
            closes_at=time.monotonic() + s.batch_max_age,
        )

    def _frame_partitions(self, chunk: bytes, seq: int, received: float, now: float) -> None:
        """Add chunk `seq`'s payloads to their partitions' open batches."""
        assert self.partitioner is not None
        s = self.settings
        parts, fallbacks = self.partitioner.split(chunk, received)
        if fallbacks:
            metrics.EVENT_TIME_FALLBACKS.inc(fallbacks)
        self.completion.split(seq, len(parts))
        waits = self.completion.waits(seq)
        open_ = self._partitions
        for partition, lines in parts.items():
            batch = open_.get(partition)
            if batch is None:
                batch = open_[partition] = self._new_batch(seq, now, partition)
            else:
                open_.move_to_end(partition)
            before = batch.nbytes
            batch.add_lines(seq, lines, now)
            self._partition_bytes += batch.nbytes - before
            batch.waiters += waits
            if batch.full:
                self._close_partition(partition)
        budget = OPEN_BATCHES * s.batch_max_bytes
        while len(open_) > s.max_open_partitions or self._partition_bytes > budget:
            self._close_partition(next(iter(open_)))  # the least recently written
            metrics.PARTITIONS_CLOSED_EARLY.inc()

    def _close_partition(self, partition: str) -> None:
        batch = self._partitions.pop(partition)
        self._partition_bytes -= batch.nbytes
        assert self.keys is not None
        self._handoff.append(batch.close(self.keys))
        metrics.BATCHES_CLOSED.inc()

    def _close_partitions(self, *, due: bool = False, waited: bool = False) -> None:
        """Close every partition's batch; with `due`, those past their age (and with
        `waited`, those a client waits for)."""
        now = time.monotonic()
        for partition, batch in list(self._partitions.items()):
            if not due or batch.closes_at <= now or (waited and batch.waiters):
                self._close_partition(partition)

    def _withdraw(self, seq: int) -> None:
        """Chunk `seq`'s spool write failed and its client got 503: it is not delivered."""
        metrics.PAYLOADS_WITHDRAWN.inc(self.spool.refused.pop(seq))
        self.completion.forget(seq)  # answered already
        if self.partitioner is not None:  # other partitions' batches leave it out too
            self._withdrawn.add(seq)

    def _close_open(self) -> None:
        if self._open is not None and self._open.payloads:
            assert self.keys is not None
            self._handoff.append(self._open.close(self.keys))
            metrics.BATCHES_CLOSED.inc()
        self._open = None

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
        if self._withdrawn:  # no batch still to record can hold those below the oldest open
            lowest = min((b.first for b in self._partitions.values()), default=self._taken_seq)
            self._withdrawn = {s for s in self._withdrawn if s >= lowest}

    async def record(self, upload: Upload) -> bool:
        """Make the batch's boundaries durable before its upload may begin.

        False if nothing is left of it: each of its chunks was withdrawn.
        """
        spool = self.spool
        await spool.settled()  # each of its chunks is now durable or refused
        gone = spool.refused or self._withdrawn
        if gone and (late := [s for s in upload.chunks if s in gone]):
            for seq in late:  # framed before its write failed: leave it out
                if seq in spool.refused:
                    self._withdraw(seq)
            upload.excluded |= frozenset(late)
            upload.unload()  # its body holds them: it is read back from the spool instead
            if not [s for s in upload.chunks if s not in upload.excluded]:
                return False
        seqs = upload.seqs
        marker = Marker(
            seqs.start,
            seqs.stop - 1,
            upload.key,
            upload.compression,
            upload.first,
            upload.excluded,
            upload.format,
            upload.partition,
        )
        await spool.wait(spool.append_marker(marker), refuses=False)
        return True
