"""The spool on its own: framing, group commit, replay, damage, freeing segments."""

from __future__ import annotations

import asyncio
import os
import struct
import zlib

import pytest

from fastingest.spool import Spool, SpoolError, _new_segment
from fastingest.spool_records import BATCH, DATA, Marker, head


def run(coro):
    return asyncio.run(coro)


async def fill(spool: Spool, chunks: list[bytes], start: int = 0) -> int:
    ticket = 0
    for i, chunk in enumerate(chunks):
        ticket = spool.append(DATA, start + i, 1700000000.0 + i, chunk)
    await spool.wait(ticket)
    return ticket


def frame(kind: int, seq: int, ts: float, body: bytes) -> bytes:
    """A whole record, as the spool writes it."""
    return head(kind, seq, ts, body) + body


MARKER = Marker(0, 9, "dt=x/key-0-9.ndjson.zst", "zstd", 1700000000.0, frozenset({3}))


def test_records_survive_a_restart_in_order(tmp_path):
    chunks = [b'{"n":%d}\n' % i for i in range(100)]

    async def first():
        spool = Spool(tmp_path, 1 << 30)
        assert spool.open() == []
        await fill(spool, chunks)
        await spool.wait(spool.append_marker(MARKER))
        await spool.close()
        return spool.id, spool.epoch

    ident, epoch = run(first())

    async def second():
        spool = Spool(tmp_path, 1 << 30)
        records = spool.open()
        assert (spool.id, spool.epoch) == (ident, epoch + 1)
        data = [r for r in records if r.kind == DATA]
        assert [r.body for r in data] == chunks and [r.seq for r in data] == list(range(100))
        assert all(r.epoch == epoch for r in records)
        (mark,) = [r for r in records if r.kind == BATCH]
        assert mark.batch == MARKER  # its compression and left-out chunks included
        await spool.close()

    run(second())


def test_group_commit_shares_fsyncs(tmp_path, monkeypatch):
    syncs = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (syncs.append(fd), real(fd))[1])

    async def main():
        spool = Spool(tmp_path, 1 << 30)
        spool.open()
        before = len(syncs)
        tickets = [spool.append(DATA, i, 0.0, b"{}\n") for i in range(500)]
        await asyncio.gather(*(spool.wait(t) for t in tickets))
        assert len(syncs) - before <= 3  # 500 waiters, a couple of fsyncs
        await spool.close()

    run(main())


def test_when_durable_calls_back_after_the_fsync_and_at_once_after_that(tmp_path, caplog):
    async def main():
        spool = Spool(tmp_path, 1 << 30)
        spool.open()
        calls: list[tuple[str, SpoolError | None]] = []
        ticket = spool.append(DATA, 0, 0.0, b"{}\n")

        def broken(failed: SpoolError | None) -> None:
            raise RuntimeError("a bug in one waiter")

        spool.when_durable(ticket, broken)
        spool.when_durable(ticket, lambda failed: calls.append(("first", failed)))
        assert calls == []  # nothing is on disk before the flusher has run
        await spool.wait(ticket)
        assert calls == [("first", None)]  # the broken waiter before it did not stop it
        spool.when_durable(ticket, lambda failed: calls.append(("later", failed)))
        assert calls[-1] == ("later", None)  # already durable: called at once
        await spool.close()

    run(main())
    assert "a spool waiter failed" in caplog.text


def test_fsyncs_run_in_the_spools_own_thread_until_close(tmp_path, monkeypatch):
    import threading

    import fastingest.spool as mod

    where: list[tuple[str, bool]] = []
    real = mod._write

    def spy(fd: int, data: bytes, good: int, sync: bool) -> None:
        where.append((threading.current_thread().name, sync))
        real(fd, data, good, sync)

    monkeypatch.setattr(mod, "_write", spy)

    async def main():
        spool = Spool(tmp_path, 1 << 30)
        spool.open()
        spool.append(DATA, 0, 0.0, b"{}\n", sync=False)
        await spool.wait(spool.append(DATA, 1, 0.0, b"{}\n"))
        syncing = spool._syncer._thread
        assert syncing is not None and syncing.is_alive()
        await spool.close()
        assert not syncing.is_alive()

    run(main())
    assert all(name == "fastingest-spool-sync" for name, synced in where if synced)
    assert any(synced for _, synced in where)


def test_a_spool_dropped_without_close_ends_its_thread(tmp_path):
    import gc

    async def main():
        spool = Spool(tmp_path, 1 << 30)
        spool.open()
        await spool.wait(spool.append(DATA, 0, 0.0, b"{}\n"))
        return spool._syncer._thread

    syncing = run(main())  # the spool is gone with the loop, never closed (a crash)
    gc.collect()
    assert syncing is not None
    syncing.join(timeout=10)
    assert not syncing.is_alive()


def test_unsynced_records_are_written_and_fsynced_on_demand(tmp_path, monkeypatch):
    import fastingest.spool as mod
    from fastingest import metrics

    writes: list[tuple[int, bool]] = []  # (bytes, fsynced) per flush
    real = mod._write

    def spy(fd: int, data: bytes, good: int, sync: bool) -> None:
        writes.append((len(data), sync))
        real(fd, data, good, sync)

    monkeypatch.setattr(mod, "_write", spy)
    chunk = b'{"pad":"%s"}\n' % (b"x" * 89)  # 100 bytes: 125 a record, 32 records a segment

    async def main():
        spool = Spool(tmp_path, 1 << 30, segment_bytes=4096)
        spool.open()
        durable = metrics.total(metrics.PAYLOADS_DURABLE)
        tickets = []

        async def add(seq: int) -> None:
            tickets.append(spool.append(DATA, seq, 0.0, chunk, 1, sync=False))
            if seq % 7 == 0:
                await asyncio.sleep(0.005)  # several flushes, not one

        async def idle() -> None:
            while spool._flusher is not None:
                await asyncio.sleep(0.005)

        for seq in range(100):
            await add(seq)
        await idle()
        if not spool.segments[-1].runs:  # the last flush ended a segment: put one in the next
            await add(100)
            await idle()
        n = len(tickets)
        unsynced = spool.segments[-1].overlap(0, n)
        # Written, yet fsynced only where a segment ended (before the next one began).
        assert sum(size for size, _ in writes) == n * 125
        assert sum(synced for _, synced in writes) == len(spool.segments) - 1 >= 2
        assert metrics.total(metrics.PAYLOADS_DURABLE) - durable == n - unsynced
        await spool.wait(tickets[-1])  # waiting is what asks for the fsync
        assert writes[-1] == (0, True)  # nothing left to write: only the fsync
        assert metrics.total(metrics.PAYLOADS_DURABLE) - durable == n
        await spool.wait(tickets[0])  # long since durable: returns at once
        await spool.close()
        return n

    n = run(main())
    assert [r.seq for r in Spool(tmp_path, 1 << 30).open()] == list(range(n))


def test_segments_are_freed_once_everything_in_them_is_stored(tmp_path):
    async def main():
        spool = Spool(tmp_path, 1 << 30, segment_bytes=1000)
        spool.open()
        for i in range(60):  # ~20 bytes of chunk + 25 of header each: several segments
            await spool.wait(spool.append(DATA, i, 0.0, b'{"i":%02d, "pad":"xx"}\n' % i))
        segments = sorted(tmp_path.glob("seg-*.log"))
        assert len(segments) >= 3
        spool.stored(range(0, 30))
        await spool.unlinked()  # deleted in a thread
        left = sorted(tmp_path.glob("seg-*.log"))
        assert len(left) < len(segments)
        spool.stored(range(30, 60))
        await spool.close()
        assert list(tmp_path.glob("seg-*.log")) == []
        assert spool.on_disk == 0

    run(main())


@pytest.mark.parametrize("as_range", [True, False])
def test_runs_across_segments_and_the_write_buffer_settle_exactly(tmp_path, as_range):
    async def main():
        spool = Spool(tmp_path, 1 << 30, segment_bytes=300)
        spool.open()
        for seq in range(40):  # one flush each, so the segments roll: several of them
            await spool.wait(spool.append(DATA, seq, 0.0, b'{"i":1,"pad":"xxxxxxxx"}\n'))
        for seq in range(40, 46):  # still in the write buffer when stored below
            ticket = spool.append(DATA, seq, 0.0, b"{}\n")
        assert len(spool.segments) >= 4
        spool.stored([0, 1, 2, 7, 8, 20])  # gaps: runs of one and of several
        rest = [s for s in range(46) if s not in (0, 1, 2, 7, 8, 20)]
        spool.stored(range(3, 7) if as_range else [3, 4, 5, 6])
        spool.stored(range(9, 20) if as_range else list(range(9, 20)))
        spool.stored(range(21, 46) if as_range else [s for s in rest if s > 20])
        await spool.wait(ticket)
        assert len(spool.segments) <= 2  # the active one, and the one 40-45 may have filled
        assert [seg.pending for seg in spool.segments] == [0] * len(spool.segments)
        await spool.close()
        assert list(tmp_path.glob("seg-*.log")) == []

    run(main())


def test_a_marker_keeps_its_segment_until_the_batch_is_stored(tmp_path):
    async def main():
        spool = Spool(tmp_path, 1 << 30, segment_bytes=200)
        spool.open()
        await fill(spool, [b'{"a":1}\n'] * 5)
        await spool.wait(spool.append_marker(Marker(0, 4, "k", "none", 0.0)))
        await fill(spool, [b'{"b":2}\n'] * 8, start=5)  # rolls past the marker's segment
        spool.stored(range(0, 5))  # data stored, marker not yet
        first = tmp_path / "seg-00000001-000001.log"  # holds the marker
        assert first.exists()
        spool.stored([], marker=0)
        await spool.unlinked()
        assert not first.exists()
        await spool.close()

    run(main())


def test_stored_before_written_is_remembered(tmp_path):
    async def main():
        spool = Spool(tmp_path, 1 << 30)
        spool.open()
        ticket = spool.append(DATA, 0, 0.0, b"{}\n")
        spool.stored([0])  # uploaded before the flusher wrote its record
        await spool.wait(ticket)
        assert spool.segments[-1].pending == 0
        await spool.close()
        assert list(tmp_path.glob("seg-*.log")) == []

    run(main())


def test_the_record_checksum_is_zlibs_crc32(tmp_path):
    """A record built with zlib and struct alone (what any writer of the format makes) replays."""
    body = b'{"n":1}\n'
    meta = struct.pack("<BQd", DATA, 7, 1700000000.5)
    record = struct.pack("<II", len(body), zlib.crc32(meta + body)) + meta + body
    assert frame(DATA, 7, 1700000000.5, body) == record
    fd = _new_segment(tmp_path / "seg-00000000-000000.log", 0)  # as an earlier run left it
    os.write(fd, record)
    os.close(fd)
    spool = Spool(tmp_path, 1 << 30)
    (found,) = spool.open()
    assert (found.seq, found.time, found.body, spool.damaged) == (7, 1700000000.5, body, 0)
    run(spool.close())


@pytest.mark.parametrize("damage", ["torn", "corrupt", "garbage-header"])
def test_damaged_tail_is_quarantined_and_the_rest_replays(tmp_path, damage):
    async def write():
        spool = Spool(tmp_path, 1 << 30)
        spool.open()
        await fill(spool, [b'{"n":%d}\n' % i for i in range(10)])
        await spool.close()

    run(write())
    (seg,) = tmp_path.glob("seg-*.log")
    data = bytearray(seg.read_bytes())
    good = len(data)
    if damage == "torn":
        data += frame(DATA, 10, 0.0, b'{"n":10}\n')[:-4]  # the crash cut the last write short
    elif damage == "corrupt":
        data += frame(DATA, 10, 0.0, b'{"n":10}\n')
        data[-3] ^= 0xFF  # a flipped bit in the last record
    else:
        data += os.urandom(7)
    seg.write_bytes(bytes(data))

    spool = Spool(tmp_path, 1 << 30)
    records = spool.open()
    assert [r.seq for r in records] == list(range(10))
    assert spool.damaged == 1
    (bad,) = (tmp_path / "quarantine").glob("*.bad")
    assert bad.read_bytes() == bytes(data[good:])
    assert seg.stat().st_size == good
    run(spool.close())


def test_a_segment_in_another_format_is_quarantined_whole_and_named(tmp_path, caplog):
    old = tmp_path / "seg-00000001-000001.log"
    old.write_bytes(b"FISPOOL1" + b"\x01\x00\x00\x00" + b"records of that format")
    spool = Spool(tmp_path, 1 << 30)
    assert spool.open() == [] and spool.damaged == 1
    assert "a segment in another format (FISPOOL1)" in caplog.text
    (bad,) = (tmp_path / "quarantine").glob("*.bad")
    assert bad.read_bytes().startswith(b"FISPOOL1")
    run(spool.close())


def test_a_second_process_cannot_share_a_spool(tmp_path):
    first = Spool(tmp_path, 1 << 30)
    first.open()
    with pytest.raises(SystemExit, match="in use"):
        Spool(tmp_path, 1 << 30).open()


def test_full_spool_refuses(tmp_path):
    async def main():
        spool = Spool(tmp_path, 300)
        spool.open()
        spool.check(100)
        await fill(spool, [b"x" * 200])
        with pytest.raises(SpoolError, match="limit"):
            spool.check(100)
        await spool.close()

    run(main())


def test_write_failure_fails_the_waiters_and_recovers(tmp_path, monkeypatch):
    import fastingest.spool as mod

    real = mod._write
    failures = iter([OSError(28, "No space left on device")])

    def flaky(fd, data, good, sync):
        for exc in failures:
            raise exc
        return real(fd, data, good, sync)

    monkeypatch.setattr(mod, "_write", flaky)

    async def main():
        spool = Spool(tmp_path, 1 << 30)
        spool.open()
        ticket = spool.append(DATA, 0, 0.0, b"{}\n")
        with pytest.raises(SpoolError, match="No space"):
            await spool.wait(ticket)
        with pytest.raises(SpoolError, match="failed a moment ago"):
            spool.check(10)
        spool._failed_until = 0.0
        await spool.wait(spool.append(DATA, 1, 0.0, b"{}\n"))  # the disk is back
        await spool.close()

    run(main())
    spool = Spool(tmp_path, 1 << 30)
    assert [r.seq for r in spool.open()] == [1]  # the failed record left nothing behind


def test_a_segment_stored_while_it_rolls_is_still_deleted(tmp_path):
    """The next segment starts in a thread; what was stored meanwhile must not linger."""

    async def main():
        spool = Spool(tmp_path, 1 << 30, segment_bytes=300)
        spool.open()
        first = spool.segments[-1].path
        seqs = range(12)  # ~45 bytes each: one flush fills the segment and rolls it
        for seq in seqs:
            ticket = spool.append(DATA, seq, 0.0, b'{"i":1,"pad":"xxxxxxx"}\n')
        spool.stored(seqs)  # stored before the flusher wrote (or rolled) anything
        await spool.wait(ticket)  # answered before the roll
        await spool.wait(spool.append(DATA, 12, 0.0, b"{}\n"))  # flushed after it
        assert len(spool.segments) == 1 and spool.segments[0].path != first
        await spool.unlinked()
        assert not first.exists()
        await spool.close()

    run(main())


def test_a_segment_that_cannot_be_started_leaves_no_file(tmp_path, monkeypatch):
    """A headless segment file would be reported as damaged at the next start."""

    def failing_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    path = tmp_path / "seg-00000001-000002.log"
    with pytest.raises(OSError):
        _new_segment(path, 1)
    assert not path.exists()
