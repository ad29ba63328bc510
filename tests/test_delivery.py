"""Delivery on its own (in-process, a real spool and local sink): a failing sink parks
the object with its bytes in the spool and delivers it once the sink heals; an object
past the delivery window is dead-lettered; either way its spool record is freed once."""

from __future__ import annotations

import asyncio
import time

from fastingest.batching import Upload
from fastingest.deadletter import DeadLetter
from fastingest.delivery import Completion, Delivery
from fastingest.queue import RingQueue
from fastingest.sinks.local import LocalSink
from fastingest.spool import Spool
from fastingest.spool_records import DATA, Marker

CHUNK = b'{"a":1}\n'
KEY = "dt=2026-01-01/hour=00/one.ndjson"


class Rig:
    def __init__(self, tmp_path, sink_root, window: float = 3600) -> None:
        self.spool = Spool(tmp_path / "spool", 1 << 30)
        self.spool.open()
        self.completion = Completion(self.spool)
        self.delivery = Delivery(
            LocalSink(sink_root),
            self.spool,
            DeadLetter(tmp_path / "dead-letter"),
            RingQueue(4),
            self.completion.done,
            window=window,
            retry_base=0.01,
            retry_max=0.05,
        )

    async def accepted(self) -> tuple[Upload, asyncio.Future[bool]]:
        """One chunk spooled and batched as the pipeline does: its bytes only on disk."""
        now = time.time()
        await self.spool.wait(self.spool.append(DATA, 0, now, CHUNK, 1))
        await self.spool.wait(self.spool.append_marker(Marker(0, 0, KEY, "none", now)))
        upload = Upload.batch(
            KEY, range(1), "none", opened=now, last=now, raw_size=len(CHUNK), payloads=1
        )
        return upload, self.completion.wait(0)

    async def close(self) -> None:
        await self.delivery.close()
        await self.spool.close()


def test_a_failing_sink_parks_the_object_and_delivers_it_once_it_heals(tmp_path):
    blocker = tmp_path / "objects"
    blocker.write_text("a file where the sink's directory should be")

    async def main() -> None:
        rig = Rig(tmp_path, blocker / "root")
        rig.delivery.start()
        upload, stored = await rig.accepted()
        await rig.delivery.store(upload)  # fails in place a few times, then parks it
        assert rig.delivery.failing and list(rig.delivery.backlog) == [upload]
        assert not upload.body and not stored.done()  # the bytes wait in the spool
        blocker.unlink()  # the sink heals: the next probe stores it
        assert await asyncio.wait_for(stored, 10) is True
        assert not rig.delivery.failing and not rig.delivery.backlog
        await rig.close()

    asyncio.run(main())
    assert (blocker / "root" / KEY).read_bytes() == CHUNK
    assert Spool(tmp_path / "spool", 1 << 30).open() == []  # freed once stored


def test_an_object_past_the_delivery_window_is_dead_lettered(tmp_path):
    blocker = tmp_path / "objects"
    blocker.write_text("a file where the sink's directory should be")

    async def main() -> None:
        rig = Rig(tmp_path, blocker / "root", window=0)
        upload, stored = await rig.accepted()
        await rig.delivery.store(upload)
        assert stored.result() is False  # answered: dead-lettered, not in the sink
        await rig.close()

    asyncio.run(main())
    assert (tmp_path / "dead-letter" / KEY).read_bytes() == CHUNK
    assert (tmp_path / "dead-letter" / (KEY + ".error.json")).exists()
    assert Spool(tmp_path / "spool", 1 << 30).open() == []
