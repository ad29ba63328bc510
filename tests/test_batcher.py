"""The batcher on its own: chunks in acceptance order -> closed objects, each batch's
boundaries recorded in the spool before it is handed on."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import pyarrow.parquet as pq
import pytest
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
        now = time.time()
        self.spool.append(DATA, seq, now, chunk, chunk.count(b"\n"))
        self.batcher.put(chunk, chunk.count(b"\n"), now)
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


def test_each_partition_has_its_own_batch_and_a_chunk_settles_with_its_last(tmp_path):
    async def main() -> None:
        rig = Rig(tmp_path, partition_by=("k",), batch_max_payloads=3, batch_max_age=60)
        rig.start()
        rig.submit(b'{"k":"a","n":0}\n{"k":"b","n":1}\n{"k":"a","n":2}\n')
        rig.submit(b'{"k":"b","n":3}\n')
        rig.submit(b'{"k":"a","n":4}\n{"n":5}\n')  # "a" reaches 3 payloads and closes
        assert await until(lambda: rig.jobs.qsize() == 1)
        (a,) = rig.handed_over()
        assert a.key.startswith("k=a/dt=") and a.holds == (0, 2) and a.seqs == range(0, 3)
        assert a.parts == [b'{"k":"a","n":0}\n', b'{"k":"a","n":2}\n', b'{"k":"a","n":4}\n']
        # A client waiting for chunk 3 closes the batches holding it once the intake is dry.
        stored = rig.completion.wait(rig.seq)
        rig.submit(b'{"k":"b","n":6}\n')
        assert await until(lambda: rig.jobs.qsize() == 1)
        (b,) = rig.handed_over()
        assert b.key.startswith("k=b/") and b.holds == (0, 1, 3) and b.payloads == 3
        rig.completion.done(b, True)
        assert stored.result() is True
        await rig.stop()  # the last partition closes on the way out
        (none,) = rig.handed_over()
        assert none.key.startswith("k=__HIVE_DEFAULT_PARTITION__/") and none.holds == (2,)
        # Chunk 0 has payloads in "a" and "b": it is stored with the later of the two.
        assert rig.completion._parts_left == {0: 1, 2: 2}  # "b" is stored, "a" not yet
        rig.completion.done(a, True)
        assert rig.completion._parts_left == {2: 1}
        # Each batch's marker names its partition, in the spool, under the key it was given.
        records = Spool(Settings(data_dir=tmp_path).spool_path, 1 << 30).open()
        markers = {r.batch.partition: r.batch for r in records if r.kind == BATCH}
        assert {p: (m.first, m.last, m.key) for p, m in markers.items()} == {
            u.partition: (u.seqs.start, u.seqs.stop - 1, u.key) for u in (a, b, none)
        }

    asyncio.run(main())


def test_the_least_recently_written_partition_closes_first_past_the_bounds(tmp_path):
    async def main() -> None:
        rig = Rig(tmp_path, partition_by=("k",), max_open_partitions=2, batch_max_age=60)
        rig.start()
        for k in ["a", "b", "a", "c", "d"]:  # c closes b (a was written since); d closes a
            rig.submit(b'{"k":"%s"}\n' % k.encode())
        assert await until(lambda: rig.jobs.qsize() == 2)
        assert [u.partition for u in rig.handed_over()] == ["k=b/", "k=a/"]
        assert len(rig.batcher._partitions) == 2
        await rig.stop()

    asyncio.run(main())


def test_open_partitions_share_a_byte_budget(tmp_path):
    from fastingest.batcher import OPEN_BATCHES

    async def main() -> None:
        rig = Rig(
            tmp_path,
            partition_by=("k",),
            batch_max_bytes=64 * 1024,
            batch_max_age=60,
            max_open_partitions=100_000,  # so that only the bytes bound them
        )
        rig.start()
        pad = "x" * 2000
        for i in range(OPEN_BATCHES * 64 + 10):  # a distinct value each: all early closes
            rig.submit(b'{"k":%d,"pad":"%s"}\n' % (i, pad.encode()))
        assert await until(lambda: rig.jobs.qsize() >= 10)
        held = sum(b.nbytes for b in rig.batcher._partitions.values())
        assert held <= OPEN_BATCHES * 64 * 1024
        await rig.stop()

    asyncio.run(main())


def test_a_partition_closes_on_its_own_age_while_others_are_written(tmp_path):
    async def main() -> None:
        rig = Rig(tmp_path, partition_by=("k",), batch_max_age=0.2)
        rig.start()
        rig.submit(b'{"k":"quiet"}\n')
        deadline = time.monotonic() + 3
        while rig.jobs.qsize() == 0 and time.monotonic() < deadline:
            rig.submit(b'{"k":"busy"}\n')  # keeps the intake from running dry
            await asyncio.sleep(0.005)
        assert [u.partition for u in rig.handed_over()][:1] == ["k=quiet/"]
        await rig.stop()

    asyncio.run(main())


def test_a_parquet_batch_is_left_for_a_seal_thread(tmp_path):
    async def main() -> None:
        rig = Rig(tmp_path, format="parquet", batch_max_age=60)
        rig.start()
        rig.submit(b'{"a":1}\n')
        rig.submit(b"[2]\n")
        await rig.stop()
        (upload,) = rig.handed_over()
        assert not upload.sha256 and upload.parts  # not converted on the event loop
        assert upload.key.endswith(".parquet") and upload.rejects_key.startswith(
            "format-conversion-failed/dt="
        )
        upload.seal()
        assert [o.key for o in upload.objects()] == [upload.rejects_key, upload.key]
        assert upload.metadata()["fastingest-payloads"] == "1" and upload.rejected == 1

    asyncio.run(main())


@pytest.mark.parametrize("fmt", ["parquet", "ndjson"])
def test_while_the_seal_thread_is_busy(tmp_path, monkeypatch, fmt):
    """Partitions' Parquet batches wait for it with their bytes packed, not to be read back
    from the spool; an NDJSON batch is compressed on the loop instead of waiting."""

    async def main() -> None:
        rig = Rig(
            tmp_path, format=fmt, partition_by=("k",), max_open_partitions=1, batch_max_age=60
        )
        rig.start()
        for i in range(5):  # each closes the one before: one partition open
            rig.submit(b'{"k":%d,"pad":"%s"}\n' % (i, b"x" * 70_000))
        rig.batcher.intake.close()
        assert rig.task is not None
        await rig.task
        uploads = rig.handed_over()
        release = threading.Event()
        seal = Upload.seal

        def slow_seal(upload: Upload) -> None:
            if threading.current_thread() is not threading.main_thread():  # a seal thread
                release.wait(10)
            seal(upload)

        async def no_reload(upload: Upload, spool: object) -> None:
            raise AssertionError(f"{upload.key} was read back")

        monkeypatch.setattr(Upload, "seal", slow_seal)
        monkeypatch.setattr(Upload, "reload", no_reload)
        loading = [asyncio.create_task(rig.delivery._load(u)) for u in uploads]
        await asyncio.sleep(0.2)
        if fmt == "parquet":  # one in the seal thread, the others waiting packed
            assert [bool(u.parts) for u in uploads] == [True] + [False] * 4
            assert [bool(u.packed) for u in uploads] == [False] + [True] * 4
            assert all(len(u.packed) < 1_000 for u in uploads[1:])  # 70 kB of one byte
        else:  # one in the seal thread, the others compressed here
            assert [bool(u.sha256) for u in uploads] == [False] + [True] * 4
        release.set()
        await asyncio.gather(*loading)
        assert all(u.sha256 and u.payloads == 1 and not u.packed for u in uploads)
        if fmt == "parquet":
            tables = [pq.read_table(io.BytesIO(u.body)) for u in uploads]
            assert [t.column("k").to_pylist() for t in tables] == [[i] for i in range(5)]
        await rig.spool.close()

    asyncio.run(main())
