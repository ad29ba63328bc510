"""What a start does with the spool an earlier run left: every chunk delivered once.

A chunk that a recorded batch holds may already be in the sink under that batch's
key, so the batch is rebuilt exactly (same key, same chunks) and parked for delivery,
where the conditional PUT turns a repeat into a no-op. A chunk no batch holds was
never uploaded: in batch mode consecutive ones are batched where they lie (each such
batch recorded before its upload like any other, so that a crash during the replay
leaves them covered, never requeued twice); in per-payload mode each payload gets
the key its first run would have given it.
"""

from __future__ import annotations

import logging

from fastingest import metrics
from fastingest.batcher import Batcher
from fastingest.batching import EXTENSIONS, Upload, per_payload
from fastingest.spool_records import BATCH, DATA, Marker, Record

log = logging.getLogger("fastingest.replay")


async def replay(records: list[Record], batcher: Batcher) -> None:
    """Park what `records` (the spool's contents at start) still owe the sink."""
    spool = batcher.spool
    data = {r.seq: r for r in records if r.kind == DATA}
    lowest = min(data, default=0)  # chunks below it were in segments deleted as stored
    covered: set[int] = set()
    for marker in (r.batch for r in records if r.kind == BATCH):
        covered.update(range(marker.first, marker.last + 1))
        upload = _recorded(marker, data, lowest)
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
        "replayed the spool: %d chunks, %d damaged tails quarantined", len(data), spool.damaged
    )


def _recorded(marker: Marker, data: dict[int, Record], lowest: int) -> Upload | None:
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
    return Upload.batch(
        marker.key,
        range(marker.first, marker.last + 1),
        marker.compression,
        opened=marker.opened,
        last=max(c.time for c in chunks),
        raw_size=sum(len(c.body) for c in chunks),
        payloads=sum(c.body.count(b"\n") for c in chunks),
        excluded=marker.excluded | frozenset(missing),
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


async def _rebatch(chunks: list[Record], batcher: Batcher) -> None:
    """Record consecutive chunks an earlier run left unbatched as a batch, then park it."""
    assert batcher.keys is not None
    compression = batcher.settings.compression
    first, last = chunks[0], chunks[-1]
    upload = Upload.batch(
        batcher.keys.batch(first.time, first.seq, last.seq, EXTENSIONS[compression]),
        range(first.seq, last.seq + 1),
        compression,
        opened=first.time,
        last=max(c.time for c in chunks),
        raw_size=sum(len(c.body) for c in chunks),
        payloads=sum(c.body.count(b"\n") for c in chunks),
    )
    await batcher.record(upload)
    metrics.BATCHES_CLOSED.inc()
    metrics.PAYLOADS_REPLAYED.inc(upload.payloads)
    batcher.delivery.park(upload)
