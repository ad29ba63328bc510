"""The batcher on its own: chunks in acceptance order -> closed objects, each batch's
boundaries recorded in the spool before it is handed on."""

from __future__ import annotations

import asyncio
import time

import zstandard

from fastingest.batcher import Batcher
from fastingest.batching import KeyMaker, Upload
from fastingest.config import Settings
from fastingest.deadletter import DeadLetter
from fastingest.delivery import Completion, Delivery
from fastingest.queue import RingQueue
from fastingest.sinks.local import LocalSink
from fastingest.spool import Spool
from fastingest.spool_records import BATCH, DATA


class Rig:
    """A batcher with the parts the pipeline gives it: a spool, a delivery, a jobs queue."""

    def __init__(self, tmp_path, jobs: int = 100, **settings) -> None:
        self.settings = Settings(data_dir=tmp_path, **settings)
        self.spool = Spool(self.settings.spool_path, self.settings.spool_max_bytes)
        self.spool.open()
        self.keys = KeyMaker("", self.spool.id, self.spool.epoch, host="h")
        self.jobs: RingQueue[Upload] = RingQueue(jobs)
        self.completion = Completion(self.spool)
        self.delivery = Delivery(
            LocalSink(tmp_path / "objects"),
            self.spool,
            DeadLetter(self.settings.dead_letter_path),
            self.jobs,
            self.completion.done,
            window=3600,
            retry_base=0.1,
            retry_max=1,
        )
        self.batcher = Batcher(self.settings, self.spool, self.delivery, self.jobs, self.completion)
        self.seq = 0
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = self.batcher.start(self.keys, 0)

    def submit(self, chunk: bytes) -> int:
        """What Pipeline.submit does: spool the chunk, then queue it."""
        seq = self.seq
        self.seq += 1
        self.spool.append(DATA, seq, time.time(), chunk, chunk.count(b"\n"))
        self.batcher.put(chunk, chunk.count(b"\n"))
        return seq

    def handed_over(self) -> list[Upload]:
        return self.jobs.get_many(1000)

    async def stop(self) -> None:
        self.batcher.intake.close()
        assert self.task is not None
        await self.task
        await self.spool.close()


def ndjson(upload: Upload) -> bytes:
    return zstandard.ZstdDecompressor().stream_reader(upload.body).read()


async def until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def test_batches_close_on_their_payload_threshold_and_are_recorded(tmp_path):
    chunks = [b'{"n":%d}\n' % i for i in range(7)]

    async def main() -> list[Upload]:
        rig = Rig(tmp_path, batch_max_payloads=3, batch_max_age=60)
        rig.start()
        for chunk in chunks:
            rig.submit(chunk)
        await rig.stop()  # the open batch closes on the way out
        return rig.handed_over()

    uploads = asyncio.run(main())
    assert [u.seqs for u in uploads] == [range(0, 3), range(3, 6), range(6, 7)]
    assert [u.payloads for u in uploads] == [3, 3, 1]
    assert b"".join(ndjson(u) for u in uploads) == b"".join(chunks)
    assert all(u.marker == u.seqs.start and u.key.endswith(".ndjson.zst") for u in uploads)
    # Each batch's marker is in the spool under the key it was handed on with.
    records = Spool(Settings(data_dir=tmp_path).spool_path, 1 << 30).open()
    markers = [r.batch for r in records if r.kind == BATCH]
    assert [(m.first, m.last, m.key) for m in markers] == [
        (u.seqs.start, u.seqs.stop - 1, u.key) for u in uploads
    ]


def test_a_batch_closes_on_its_age(tmp_path):
    async def main() -> None:
        rig = Rig(tmp_path, batch_max_age=0.1)
        rig.start()
        rig.submit(b'{"a":1}\n')
        started = time.monotonic()
        assert await until(lambda: rig.jobs.qsize() == 1)
        assert time.monotonic() - started >= 0.05
        await rig.stop()

    asyncio.run(main())


def test_a_client_waiting_for_its_upload_closes_the_batch_once_the_intake_is_dry(tmp_path):
    async def main() -> None:
        rig = Rig(tmp_path, batch_max_age=60)
        rig.start()
        rig.completion.wait(rig.seq)  # as an "uploaded" request registers before submitting
        rig.submit(b'{"a":1}\n')
        assert await until(lambda: rig.jobs.qsize() == 1, timeout=2)
        await rig.stop()

    asyncio.run(main())


def test_busy_workers_leave_batches_in_the_backlog_without_their_bytes(tmp_path):
    async def main() -> None:
        rig = Rig(tmp_path, jobs=1, batch_max_payloads=1, batch_max_age=60)
        rig.start()
        for i in range(3):
            rig.submit(b'{"n":%d}\n' % i)
        await rig.stop()
        (first,) = rig.handed_over()
        assert first.body  # sealed by the batcher, ready for a worker
        parked = list(rig.delivery.backlog)
        assert [u.seqs for u in parked] == [range(1, 2), range(2, 3)]
        assert all(not u.body and not u.parts for u in parked)  # read back from the spool later

    asyncio.run(main())


def test_per_payload_mode_settles_a_chunk_with_its_last_object(tmp_path):
    async def main() -> None:
        rig = Rig(tmp_path, mode="per-payload")
        rig.start()
        stored = rig.completion.wait(0)
        rig.submit(b'{"a":1}\n{"b":2}\n{"c":3}\n')
        assert await until(lambda: rig.jobs.qsize() == 3)
        uploads = rig.handed_over()
        assert [(u.part, u.parts) for u in uploads] == [
            (0, [b'{"a":1}']),
            (1, [b'{"b":2}']),
            (2, [b'{"c":3}']),
        ]
        assert all(u.key.endswith(".json") and u.marker is None for u in uploads)
        for upload in uploads[:2]:
            rig.completion.done(upload, True)
            assert not stored.done()
        rig.completion.done(uploads[2], True)
        assert stored.result() is True
        await rig.stop()

    asyncio.run(main())
