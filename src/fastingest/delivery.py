"""Delivery: each closed object into the sink, for as long as the delivery window allows.

    jobs (RingQueue[Upload]) -> WorkerPool -> Delivery.store -> sink.put
                                                   | a retryable failure
                                                   v
                                      backlog: the object's description only;
                                      its bytes wait in the spool
                                                   | the sink answers again
                                                   v
                                      read back from the spool -> jobs

The policy:

- A retryable failure (connection errors, timeouts, 5xx, throttling, and the
  403 / missing bucket an operator can fix) is retried a few times in place,
  then the sink counts as failing: the object goes to the backlog, and so does
  every batch that closes meanwhile. One object at a time probes the sink, with
  capped exponential backoff and full jitter; the first that gets through ends
  the stall, and the backlog is fed to the workers again, oldest first.
- An object the store refuses for itself (its content or size: a 4xx other
  than those above) goes to the dead-letter directory at once, and so does one
  whose first payload arrived longer than ``--delivery-window`` ago.
- A chunk's spool record is freed only once its object is in the sink or its
  dead-letter file is durably written (``Completion``). A dead-letter write that
  fails leaves the object in the backlog, to be delivered or dead-lettered later.

The backlog holds no payload bytes, so the spool, not memory, bounds how long
an outage can last: new requests get 503 only once the spool is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor

from fastingest import metrics
from fastingest.batching import Upload
from fastingest.deadletter import DeadLetter
from fastingest.errors import QueueClosed
from fastingest.queue import RingQueue
from fastingest.sinks import Sink, SinkError
from fastingest.spool import Spool

log = logging.getLogger("fastingest.delivery")

IN_PLACE_ATTEMPTS = 3  # tries of one object before the sink counts as failing
STALL_AFTER = 10.0  # seconds: an attempt that failed this slowly makes the sink failing at once
SEAL_IN_THREAD_BYTES = 64 * 1024  # smaller bodies compress faster than a thread hop


class Delivery:
    """Stores objects in the sink, keeps what it cannot store yet, and says how the sink is."""

    def __init__(
        self,
        sink: Sink,
        spool: Spool,
        dead_letter: DeadLetter,
        jobs: RingQueue[Upload],
        done: Callable[[Upload, bool], None],
        *,
        window: float,
        retry_base: float,
        retry_max: float,
        sealer: Executor | None = None,
        seal_threads: int = 1,
    ) -> None:
        self.sink = sink
        self.spool = spool
        self.dead_letter = dead_letter
        self.jobs = jobs
        self._done = done  # (upload, True if in the sink, False if dead-lettered)
        self.window = window
        self.retry_base = retry_base
        self.retry_max = retry_max
        self._sealer = sealer
        self._sealing = asyncio.Semaphore(seal_threads)
        self.backlog: deque[Upload] = deque()  # waiting for the sink, bytes in the spool
        self.in_flight: dict[int, Upload] = {}  # id -> upload a worker is storing
        self.failing_since: float | None = None  # time.time() of the stall's first failure
        self.last_error = ""
        self._probes = 0  # failed probes in a row: the backoff's exponent
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    # --- state ------------------------------------------------------------------

    @property
    def failing(self) -> bool:
        return self.failing_since is not None

    @property
    def idle(self) -> bool:
        """Nothing waits to be stored: no job queued, in a worker's hands or in the backlog."""
        return not self.backlog and not self.in_flight and not self.jobs.qsize()

    def oldest(self) -> float | None:
        """Arrival time of the oldest payload waiting here (epoch seconds)."""
        firsts = [u.first for u in self.in_flight.values()]
        if self.backlog:
            firsts.append(min(u.first for u in self.backlog))
        return min(firsts, default=None)

    # --- the worker's handler ---------------------------------------------------------

    async def store(self, upload: Upload) -> None:
        """Store one object: into the sink, else the backlog, else the dead-letter directory."""
        self.in_flight[id(upload)] = upload
        started = time.monotonic()
        attempt = 0
        try:
            await self._load(upload)
            while True:
                attempt += 1
                tried = time.monotonic()
                try:
                    stored_now = await self._put(upload)
                    break
                except SinkError as exc:
                    metrics.UPLOAD_RETRIES.labels(exc.kind).inc()
                    if not exc.retryable:
                        await self._give_up(upload, exc, attempt)
                        return
                    if self._expired(upload):
                        await self._give_up(upload, self._window_passed(exc), attempt)
                        return
                    slow = time.monotonic() - tried >= STALL_AFTER  # a timeout, not a hiccup
                    if self.failing or slow or attempt >= IN_PLACE_ATTEMPTS:
                        self._stalled(exc)
                        self.park(upload)
                        return
                    await asyncio.sleep(self._backoff(attempt))
        except OSError as exc:  # reading the spool back failed: keep it, try again later
            log.error("cannot read %s back from the spool (%s); it stays there", upload.key, exc)
            self.park(upload)
            return
        finally:
            self.in_flight.pop(id(upload), None)
        if not stored_now:
            log.info("%s was already in the sink (stored before a restart)", upload.key)
            metrics.OBJECTS_ALREADY_STORED.inc()
        metrics.UPLOAD_SECONDS.observe(time.monotonic() - started)
        objects = upload.objects()
        metrics.OBJECTS_UPLOADED.inc(len(objects))
        metrics.PAYLOADS_UPLOADED.inc(upload.payloads)
        metrics.PAYLOADS_UNCONVERTED.inc(upload.rejected)
        metrics.BYTES_OUT.inc(sum(len(o.body) for o in objects))
        self._resumed()
        self._done(upload, True)

    async def _put(self, upload: Upload) -> bool:
        """Store each of `upload`'s objects not stored yet; False if all were there already."""
        fresh = False
        for obj in upload.objects():
            if obj.key not in upload.landed:
                fresh |= await self.sink.put(obj)
                upload.landed.add(obj.key)
        return fresh

    async def _load(self, upload: Upload) -> None:
        """Give `upload` its body: read back from the spool if it was parked, then sealed
        (or converted to Parquet, always in a seal thread)."""
        if upload.sha256:
            return
        small = upload.raw_size <= SEAL_IN_THREAD_BYTES
        if upload.writer is None and (small or (upload.parts and self._sealing.locked())):
            # Small, or an NDJSON batch whose bytes are at hand while the seal threads are
            # busy: compressing it here costs the loop less than keeping its bytes while
            # it waits, or reading a partition's batch back.
            if not upload.parts:
                await upload.reload(self.spool)
            upload.seal()
            return
        # Wait for a seal thread without the bytes, which the spool has; a partition's
        # batch keeps them packed, as reading one back splits every chunk its range spans.
        if self._sealing.locked() and upload.parts:
            if upload.partitioner is not None:
                await asyncio.to_thread(upload.pack)
            elif upload.on_disk(self.spool):
                upload.unload()
        async with self._sealing:  # at most one unsealed batch per seal thread at work
            if not (upload.parts or upload.packed):
                await upload.reload(self.spool)
            await asyncio.get_running_loop().run_in_executor(self._sealer, upload.seal)

    def _expired(self, upload: Upload) -> bool:
        return time.time() - upload.first >= self.window

    def _window_passed(self, last: SinkError | str) -> str:
        return f"delivery window of {_duration(self.window)} passed; last error: {last}"

    def _backoff(self, attempt: int) -> float:
        # Full jitter: spreads a fleet's retries after a store hiccup.
        return random.uniform(0, min(self.retry_max, self.retry_base * 2 ** (attempt - 1)))

    # --- the backlog --------------------------------------------------------------

    def park(self, upload: Upload) -> None:
        """Keep `upload` for later; its bytes are dropped where the spool holds them."""
        if upload.on_disk(self.spool):
            upload.unload()
        self.backlog.append(upload)
        self._wake.set()

    @property
    def parking(self) -> bool:
        """Whether a newly closed batch should wait in the backlog rather than in `jobs`."""
        return self.failing or bool(self.backlog)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="fastingest-delivery")

    async def _run(self) -> None:
        while not self._closing:
            if not self.backlog:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.failing:
                await self._probe()
            else:
                upload = self.backlog.popleft()
                try:
                    await self.jobs.aput(upload)
                except QueueClosed:  # stopping: it stays in the spool
                    self.backlog.appendleft(upload)
                    return

    async def _probe(self) -> None:
        """While the sink fails: wait out the backoff, then try the oldest object."""
        self._probes += 1
        delay = self._backoff(self._probes)
        next_expiry = min(u.first for u in self.backlog) + self.window - time.time()
        self._wake.clear()
        with contextlib.suppress(TimeoutError):  # woken early only to stop
            await asyncio.wait_for(self._wake.wait(), max(0.0, min(delay, next_expiry)))
        if self._closing or not self.backlog:
            return
        for upload in [u for u in self.backlog if self._expired(u)]:
            self.backlog.remove(upload)
            await self._give_up(upload, self._window_passed(self.last_error), 0)
        if self.backlog and self.failing:
            upload = self.backlog.popleft()
            try:
                await self.store(upload)
            except Exception:  # a bug in store(): the object must not be lost with the task
                log.exception("storing %s failed unexpectedly; it stays in the spool", upload.key)
                self.park(upload)

    # --- the sink's state -----------------------------------------------------------

    def _stalled(self, exc: SinkError) -> None:
        self.last_error = str(exc)
        if self.failing_since is not None:
            return
        self.failing_since = time.time()
        metrics.SINK_UP.set(0)
        log.error(
            "DELIVERY STALLED: %s is failing (%s); accepted payloads stay in the spool and "
            "are retried for up to %s; clients get 503 only once the spool is full",
            self.sink,
            exc,
            _duration(self.window),
        )

    def _resumed(self) -> None:
        self._probes = 0
        if self.failing_since is None:
            return
        stalled = time.time() - self.failing_since
        self.failing_since = None
        metrics.SINK_UP.set(1)
        log.warning(
            "delivery resumed: %s answers again after %.1fs; %d objects waiting are sent now",
            self.sink,
            stalled,
            len(self.backlog),
        )
        self._wake.set()

    # --- giving up --------------------------------------------------------------------

    async def _give_up(self, upload: Upload, error: BaseException | str, attempts: int) -> None:
        """Dead-letter `upload` durably; if even that fails, it stays in the backlog."""
        try:
            await self._load(upload)
            await asyncio.to_thread(self.dead_letter.store, upload, error, attempts)
        except OSError as exc:
            log.critical(
                "cannot dead-letter %s (%s): its %d payloads stay in the spool; retrying later",
                upload.key,
                exc,
                upload.payloads,
            )
            self.last_error = f"dead-letter write failed: {exc}"
            if self.failing_since is None:
                self.failing_since = time.time()
                metrics.SINK_UP.set(0)
            self.park(upload)
            return
        self._done(upload, False)

    # --- shutdown ---------------------------------------------------------------------

    async def close(self) -> list[Upload]:
        """Stop the backlog's task; returns what it still held (all of it in the spool)."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        left = list(self.backlog)
        self.backlog.clear()
        return left


class Completion:
    """What storing an object settles: its chunks' spool records are freed, and the
    clients waiting for ack ``uploaded`` get their answer (True: in the sink, False:
    dead-lettered). In per-payload mode a chunk becomes several objects and is settled
    with the last of them."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._parts_left: dict[int, int] = {}  # per-payload mode: seq -> objects to go
        self._waiters: dict[int, asyncio.Future[bool]] = {}  # seq -> a client's "uploaded"

    def wait(self, seq: int) -> asyncio.Future[bool]:
        """A future for chunk `seq`'s storing; registered before the batcher can see it."""
        stored = self._waiters[seq] = asyncio.get_running_loop().create_future()
        return stored

    def waits(self, seq: int) -> bool:
        return seq in self._waiters

    def forget(self, seq: int) -> None:
        """Chunk `seq` is not delivered (its client got 503): nobody waits for it."""
        self._waiters.pop(seq, None)
        self._parts_left.pop(seq, None)

    def split(self, seq: int, objects: int) -> None:
        """Chunk `seq` is stored as `objects` objects (per-payload mode, partitions)."""
        if objects > 1:
            self._parts_left[seq] = objects

    def done(self, upload: Upload, uploaded: bool) -> None:
        """`upload` is stored (sink or dead letter)."""
        if not self._parts_left and not self._waiters:  # nothing to settle per seq
            self.spool.stored(upload.chunks, marker=upload.marker)
            return
        finished = []
        for seq in upload.chunks:
            left = self._parts_left.get(seq)
            if left is not None and left > 1:
                self._parts_left[seq] = left - 1
                continue
            self._parts_left.pop(seq, None)
            finished.append(seq)
            if (fut := self._waiters.pop(seq, None)) is not None and not fut.done():
                fut.set_result(uploaded)
        self.spool.stored(finished, marker=upload.marker)


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"
