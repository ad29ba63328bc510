"""A start on a spool an earlier run left: each chunk delivered once, under the key its
first run gave it (in-process: the real pipeline, spool and local sink)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter

from fastingest import pipeline
from fastingest.batching import KeyMaker, Upload
from fastingest.config import Settings
from fastingest.pipeline import Pipeline
from fastingest.sinks.local import LocalSink
from fastingest.spool import Spool
from fastingest.spool_records import DATA, Marker
from support import landed_dir, unpack

T0 = 1_700_000_000.0


def left_behind(settings: Settings, chunks: dict[int, bytes], markers: list[Marker]) -> KeyMaker:
    """A spool as a crashed run leaves it; returns that run's key maker."""

    async def write() -> KeyMaker:
        spool = Spool(settings.spool_path, settings.spool_max_bytes)
        spool.open()
        keys = KeyMaker("", spool.id, spool.epoch)
        ticket = 0
        for seq, chunk in chunks.items():
            ticket = spool.append(DATA, seq, T0 + seq, chunk, chunk.count(b"\n"))
        for m in markers:
            ticket = spool.append_marker(m)
        await spool.wait(ticket)
        await spool.close()
        return keys

    return asyncio.run(write())


def restart(settings: Settings) -> None:
    async def run() -> None:
        sink = LocalSink(settings.data_dir / "objects")
        await sink.start()
        pipeline = Pipeline(settings, sink)
        await pipeline.start()
        await pipeline.stop(30)

    asyncio.run(run())


def objects(settings: Settings) -> dict[str, bytes]:
    root = settings.data_dir / "objects"
    return {
        str(p.relative_to(root)): unpack(p.read_bytes()) for p in root.rglob("*") if p.is_file()
    }


def test_a_recorded_batch_lands_under_its_key_and_the_rest_is_batched(tmp_path):
    settings = Settings(data_dir=tmp_path, batch_max_payloads=2)
    chunks = {seq: b'{"n":%d}\n' % seq for seq in range(6)}
    # Chunks 0-2 were batched (perhaps uploaded); 3-5 were still in the intake.
    recorded = Marker(0, 2, "dt=2023-11-14/hour=22/recorded-0-2.ndjson.gz", "gzip", T0)
    left_behind(settings, chunks, [recorded])
    restart(settings)
    landed = objects(settings)
    assert landed[recorded.key] == chunks[0] + chunks[1] + chunks[2]
    gzip_magic = b"\x1f\x8b"  # as its marker says, though the configured compression is zstd
    assert (settings.data_dir / "objects" / recorded.key).read_bytes()[:2] == gzip_magic
    rest = {k: v for k, v in landed.items() if k != recorded.key}
    # Batched where they lie, two payloads at most, with the compression now configured.
    assert sorted(rest.values()) == [chunks[3] + chunks[4], chunks[5]]
    assert all(k.endswith(".ndjson.zst") for k in rest)
    assert landed_dir(tmp_path / "objects") == Counter(c.strip() for c in chunks.values())
    assert Spool(settings.spool_path, 1 << 30).open() == []  # all of it stored, all freed


def test_a_batch_whose_chunks_are_gone_was_stored_and_is_not_sent_again(tmp_path):
    settings = Settings(data_dir=tmp_path)
    # Chunks 0-2 and their segment were freed once their batch was stored; its marker
    # sits in a later segment with chunk 3, which no batch holds yet.
    stored = Marker(0, 2, "dt=2023-11-14/hour=22/stored-0-2.ndjson.zst", "zstd", T0)
    left_behind(settings, {3: b'{"n":3}\n'}, [stored])
    restart(settings)
    landed = objects(settings)
    assert stored.key not in landed
    assert list(landed.values()) == [b'{"n":3}\n']


def test_per_payload_mode_gives_each_payload_the_key_of_its_first_run(tmp_path):
    settings = Settings(data_dir=tmp_path, mode="per-payload")
    chunks = {0: b'{"a":1}\n{"b":2}\n', 1: b'{"c":3}\n'}
    keys = left_behind(settings, chunks, [])
    restart(settings)
    expected = {
        keys.payload(T0, 0, 0): b'{"a":1}',
        keys.payload(T0, 0, 1): b'{"b":2}',
        keys.payload(T0 + 1, 1, 0): b'{"c":3}',
    }
    assert objects(settings) == expected


def test_a_bug_in_storing_an_object_is_tried_again_after_a_pause(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "BUG_RETRY_SECONDS", 0.3)
    settings = Settings(data_dir=tmp_path)
    chunk = b'{"n":0}\n'
    left_behind(settings, {0: chunk}, [])
    calls: list[float] = []

    class Buggy(LocalSink):
        async def put(self, upload: Upload) -> bool:
            calls.append(time.monotonic())
            if len(calls) <= 2:
                raise RuntimeError("a bug, not a store's error")
            return await super().put(upload)

    async def run() -> None:
        sink = Buggy(settings.data_dir / "objects")
        await sink.start()
        running = Pipeline(settings, sink)
        await running.start()
        deadline = time.monotonic() + 10
        while len(calls) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await running.stop(30)

    asyncio.run(run())
    assert len(calls) == 3  # not a loop as fast as the worker can fail
    assert all(later - earlier >= 0.3 for earlier, later in itertools.pairwise(calls))
    assert list(objects(settings).values()) == [chunk]
