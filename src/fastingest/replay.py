"""What a start does with the spool an earlier run left: every chunk delivered once.

A chunk that a recorded batch holds may already be in the sink under that batch's
key, so the batch is rebuilt exactly (same key, same chunks) and parked for delivery,
where the conditional PUT turns a repeat into a no-op. A chunk no batch holds was
never uploaded: in batch mode consecutive ones are batched where they lie (each such
batch recorded before its upload like any other, so that a crash during the replay
leaves them covered, never requeued twice); in per-payload mode each payload gets
the key its first run would have given it.

A chunk taken by a partitioning run is split again as that run split it (the spool
keeps each run's partitioning): a recorded batch is its partition's payloads of
the chunks in its range, and the payloads no recorded batch holds are batched per
partition, after every recorded batch of it, so that ranges never overlap.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from fastingest import metrics
from fastingest.batcher import Batcher, parquet_writer
from fastingest.batching import Upload, extension, per_payload
from fastingest.parquet import ParquetWriter
from fastingest.partitions import Partitioner
from fastingest.spool_records import BATCH, DATA, Marker, Record

log = logging.getLogger("fastingest.replay")


async def replay(
    records: list[Record], batcher: Batcher, partitionings: dict[int, str] | None = None
) -> None:
    """Park what `records` (the spool's contents at start) still owe the sink;
    `partitionings`: each run's partitioning spec by epoch ("" or absent: none)."""
    spool = batcher.spool
    specs = partitionings or {}
    split = [r for r in records if r.kind == DATA and specs.get(r.epoch)]
    data = {r.seq: r for r in records if r.kind == DATA and not specs.get(r.epoch)}
    markers = [r.batch for r in records if r.kind == BATCH]
    if split:
        await _replay_partitions(split, [m for m in markers if m.partition], specs, batcher)
    # chunks below it were in segments deleted as stored
    lowest = min((r.seq for r in records if r.kind == DATA), default=0)
    covered: set[int] = set()
    for marker in (m for m in markers if not m.partition):
        covered.update(range(marker.first, marker.last + 1))
        upload = _recorded(marker, data, lowest, batcher)
        if upload is None:  # its first chunks' segment is gone, which only a stored batch allows
            spool.stored([s for s in marker.seqs if s in data], marker=marker.first)
            continue
        metrics.PAYLOADS_REPLAYED.inc(upload.payloads)
        batcher.delivery.park(upload)  # read back from the spool when a worker takes it
    unbatched = [data[s] for s in sorted(data) if s not in covered]
    if batcher.per_payload:
        _per_payload(unbatched, batcher)
    else:
        for group in _runs(
            unbatched, batcher.settings.batch_max_bytes, batcher.settings.batch_max_payloads
        ):
            await _rebatch(group, batcher)
    log.info(
        "replayed the spool: %d chunks, %d damaged tails quarantined",
        len(data) + len(split),
        spool.damaged,
    )


def _writer(fmt: str, compression: str, batcher: Batcher) -> ParquetWriter | None:
    """The writer for a recorded batch's format: this run's, or one for its compression."""
    if fmt != "parquet":
        return None
    writer = batcher.writer
    if writer is not None and writer.compression == compression:
        return writer
    return parquet_writer(batcher.settings, compression)


def _recorded(
    marker: Marker, data: dict[int, Record], lowest: int, batcher: Batcher
) -> Upload | None:
    """The object a recorded batch names, to be read back from the spool; None if stored."""
    present = [s for s in marker.seqs if s in data]
    missing = [s for s in marker.seqs if s not in data]
    if not present or (missing and max(missing) < lowest):
        return None
    if missing:
        log.error(
            "spool: %d chunks of %s are damaged; storing the %d that are left",
            len(missing),
            marker.key,
            len(present),
        )
    chunks = [data[s] for s in present]
    writer = _writer(marker.format, marker.compression, batcher)
    return Upload.batch(
        marker.key,
        range(marker.first, marker.last + 1),
        marker.compression,
        opened=marker.opened,
        last=max(c.time for c in chunks),
        raw_size=sum(len(c.body) for c in chunks),
        payloads=sum(c.body.count(b"\n") for c in chunks),
        excluded=marker.excluded | frozenset(missing),
        writer=writer,
        keys=batcher.keys,
    )


def _per_payload(chunks: list[Record], batcher: Batcher) -> None:
    assert batcher.keys is not None
    for r in chunks:
        uploads = per_payload(r.body, r.seq, batcher.keys, r.time, r.epoch)
        batcher.completion.split(r.seq, len(uploads))
        for upload in uploads:
            metrics.PAYLOADS_REPLAYED.inc(upload.payloads)
            batcher.delivery.park(upload)


def _runs(chunks: list[Record], max_bytes: int, max_payloads: int) -> list[list[Record]]:
    """Consecutive chunks in groups no larger than a batch."""
    groups: list[list[Record]] = []
    size = payloads = 0
    for r in chunks:
        if (
            not groups
            or r.seq != groups[-1][-1].seq + 1
            or size >= max_bytes
            or payloads >= max_payloads
        ):
            groups.append([])
            size = payloads = 0
        groups[-1].append(r)
        size += len(r.body)
        payloads += r.body.count(b"\n")
    return groups


async def _record_and_park(upload: Upload, batcher: Batcher) -> None:
    """A batch replay made: its marker recorded, as any closing batch's, then parked."""
    await batcher.record(upload)
    metrics.BATCHES_CLOSED.inc()
    metrics.PAYLOADS_REPLAYED.inc(upload.payloads)
    batcher.delivery.park(upload)


async def _rebatch(chunks: list[Record], batcher: Batcher) -> None:
    """Record consecutive chunks an earlier run left unbatched as a batch, then park it."""
    assert batcher.keys is not None
    compression = batcher.settings.compression
    first, last = chunks[0], chunks[-1]
    key = batcher.keys.batch(
        first.time, first.seq, last.seq, extension(batcher.settings.format, compression)
    )
    upload = Upload.batch(
        key,
        range(first.seq, last.seq + 1),
        compression,
        opened=first.time,
        last=max(c.time for c in chunks),
        raw_size=sum(len(c.body) for c in chunks),
        payloads=sum(c.body.count(b"\n") for c in chunks),
        writer=batcher.writer,
        keys=batcher.keys,
    )
    await _record_and_park(upload, batcher)


async def _replay_partitions(
    chunks: list[Record], markers: list[Marker], specs: dict[int, str], batcher: Batcher
) -> None:
    """Replay chunks that partitioning runs took, each split as its run split it."""
    spool = batcher.spool
    partitioners: dict[str, Partitioner] = {}
    split: dict[int, dict[str, list[bytes]]] = {}
    owner: dict[int, Partitioner] = {}
    by_seq = {r.seq: r for r in chunks}
    for r in chunks:
        spec = specs[r.epoch]
        if spec not in partitioners:
            partitioners[spec] = Partitioner.from_spec(spec)
        owner[r.seq] = partitioners[spec]
        split[r.seq] = owner[r.seq].split(r.body, r.time)[0]
    holders: dict[int, int] = defaultdict(int)  # seq -> objects that settle it
    covered: set[tuple[int, str]] = set()
    parked: list[Upload] = []
    for m in markers:
        held = [
            s
            for s in range(m.first, m.last + 1)
            if s in split and s not in m.excluded and m.partition in split[s]
        ]
        if not held:  # stored, and its chunks' segments with it
            spool.stored([], marker=m.first)
            continue
        for s in held:
            covered.add((s, m.partition))
            holders[s] += 1
        writer = _writer(m.format, m.compression, batcher)
        lines = [ln for s in held for ln in split[s][m.partition]]
        parked.append(
            Upload.batch(
                m.key,
                range(m.first, m.last + 1),
                m.compression,
                opened=m.opened,
                last=max(by_seq[s].time for s in held),
                raw_size=sum(map(len, lines)),
                payloads=len(lines),
                excluded=m.excluded,
                writer=writer,
                keys=batcher.keys,
                partition=m.partition,
                partitioner=owner[held[0]],
                holds=tuple(held),
            )
        )
    unbatched: dict[str, list[int]] = defaultdict(list)  # partition -> its chunks, in order
    for seq in sorted(split):
        for partition in split[seq]:
            if (seq, partition) not in covered:
                unbatched[partition].append(seq)
                holders[seq] += 1
    for seq in split:  # settled with the last object holding it; stored if none does
        if holders[seq] > 1:
            batcher.completion.split(seq, holders[seq])
        elif not holders[seq]:
            spool.stored([seq])
    for upload in parked:
        metrics.PAYLOADS_REPLAYED.inc(upload.payloads)
        batcher.delivery.park(upload)
    settings = batcher.settings
    for partition, seqs in unbatched.items():
        group: list[int] = []
        size = payloads = 0
        for seq in seqs:
            lines = split[seq][partition]
            full = size >= settings.batch_max_bytes or payloads >= settings.batch_max_payloads
            if group and (full or owner[seq] is not owner[group[0]]):  # one run's split each
                await _rebatch_partition(partition, group, split, by_seq, owner, batcher)
                group, size, payloads = [], 0, 0
            group.append(seq)
            size += sum(map(len, lines))
            payloads += len(lines)
        await _rebatch_partition(partition, group, split, by_seq, owner, batcher)


async def _rebatch_partition(
    partition: str,
    seqs: list[int],
    split: dict[int, dict[str, list[bytes]]],
    by_seq: dict[int, Record],
    owner: dict[int, Partitioner],
    batcher: Batcher,
) -> None:
    """Record a partition's payloads that no recorded batch holds as a batch, then park it."""
    assert batcher.keys is not None
    s = batcher.settings
    first = by_seq[seqs[0]]
    partitioner = owner[seqs[0]]
    lines = [ln for seq in seqs for ln in split[seq][partition]]
    key = batcher.keys.batch(
        first.time,
        seqs[0],
        seqs[-1],
        extension(s.format, s.compression),
        partition,
        hours=not partitioner.by_event_time,
    )
    upload = Upload.batch(
        key,
        range(seqs[0], seqs[-1] + 1),
        s.compression,
        opened=first.time,
        last=max(by_seq[seq].time for seq in seqs),
        raw_size=sum(map(len, lines)),
        payloads=len(lines),
        parts=lines,
        writer=batcher.writer,
        keys=batcher.keys,
        partition=partition,
        partitioner=partitioner,
        holds=tuple(seqs),
    )
    await _record_and_park(upload, batcher)
