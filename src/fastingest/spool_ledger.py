"""The spool's ledger: which segment holds which records, and which are not stored yet.

Segments are deleted oldest first, each once every record in it is stored (uploaded
or durably dead-lettered) and every older one is gone, so a chunk's segment can only
be missing when the chunk and every batch holding it were stored. The ledger keeps
the accounts; the spool writes and deletes the files.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fastingest.spool_records import BATCH, DATA, SEGMENT_HEADER, Record

INDEX_EVERY = 256  # data records between two entries of a replayed segment's read index


@dataclass(slots=True)
class Segment:
    """One segment file and the ledger of what in it is not stored yet."""

    path: Path
    epoch: int
    size: int = 0
    runs: list[list[int]] = field(default_factory=list)  # [start, stop) of its data seqs
    index: list[tuple[int, int]] = field(default_factory=list)  # (data seq, its offset)
    pending: int = 0  # records not yet stored (data chunks and batch markers)

    def add(self, seqs: list[int]) -> None:
        """Data seqs now in this segment, ascending, each above the ones it holds."""
        runs = self.runs
        first, last = seqs[0], seqs[-1]
        if last - first == len(seqs) - 1:  # consecutive, as nearly always: one run
            if runs and runs[-1][1] == first:
                runs[-1][1] = last + 1
            else:
                runs.append([first, last + 1])
            return
        for seq in seqs:
            if runs and runs[-1][1] == seq:
                runs[-1][1] = seq + 1
            else:
                runs.append([seq, seq + 1])

    def overlap(self, start: int, stop: int) -> int:
        """How many of seqs [start, stop) this segment holds."""
        return sum(max(0, min(stop, b) - max(start, a)) for a, b in self.runs)

    def offset(self, seq: int) -> int:
        """Where reading must start to find data seq `seq` and those after it."""
        i = bisect.bisect_right(self.index, (seq, 1 << 62)) - 1
        return self.index[i][1] if i >= 0 else SEGMENT_HEADER.size


class Ledger:
    """The segments, oldest first (the last one is being written), and their accounts."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []
        self.written_seq = -1  # the highest data seq written to a segment
        self._by_seq: list[tuple[int, Segment]] = []  # (first data seq, segment), ascending
        # batch first seq -> the segments of its markers (partitions' batches may share one)
        self._marks: dict[int, list[Segment]] = {}
        self._early: set[tuple[int, int]] = set()  # (kind, seq) stored before it was written

    def load(self, seg: Segment, records: list[Record]) -> None:
        """A segment an earlier run left, with the records read from it at start."""
        self.segments.append(seg)
        data = [r for r in records if r.kind == DATA]
        seg.index = [(r.seq, r.offset) for r in data[::INDEX_EVERY]]
        self._count(seg, [r.seq for r in data], [r.seq for r in records if r.kind == BATCH])
        self.written_seq = max(self.written_seq, data[-1].seq if data else -1)

    def begin(self, seg: Segment) -> None:
        """A new segment, the one written from now on."""
        self.segments.append(seg)

    def wrote(self, seg: Segment, data: list[int], markers: list[int]) -> None:
        """Records just written at the end of `seg` (its size not yet grown by them)."""
        if data:
            seg.index.append((data[0], seg.size))
            self.written_seq = data[-1]
        self._count(seg, data, markers)

    def _count(self, seg: Segment, data: list[int], markers: list[int]) -> None:
        """These records now live in `seg` and are pending until stored()."""
        if data:
            if not seg.runs:
                self._by_seq.append((data[0], seg))
            seg.add(data)  # stored or not: the ledger says where each seq lives
        if self._early:  # some were stored before they reached the disk: they are done
            data, markers = self._not_early(DATA, data), self._not_early(BATCH, markers)
        seg.pending += len(data) + len(markers)
        for seq in markers:
            self._marks.setdefault(seq, []).append(seg)

    def _not_early(self, kind: int, seqs: list[int]) -> list[int]:
        kept = []
        for seq in seqs:
            if (kind, seq) in self._early:
                self._early.discard((kind, seq))
            else:
                kept.append(seq)
        return kept

    def stored(self, seqs: Iterable[int], marker: int | None = None) -> None:
        """Chunks `seqs` (and the batch marker keyed by `marker`) are stored.

        A batch's seqs are a range, and each segment holds runs of consecutive seqs, so
        a range is settled a segment at a time, not a seq at a time: this runs on the
        event loop, for up to --batch-max-payloads seqs at once. Seqs no segment holds
        (refused ones) are skipped.
        """
        firsts = [first for first, _ in self._by_seq]
        for start, stop in _runs(seqs):
            if stop - 1 > self.written_seq:  # still in the write buffer
                for seq in range(max(start, self.written_seq + 1), stop):
                    self._early.add((DATA, seq))
                stop = self.written_seq + 1
            i = max(0, bisect.bisect_right(firsts, start) - 1)
            while i < len(firsts) and firsts[i] < stop:
                seg = self._by_seq[i][1]
                seg.pending -= seg.overlap(start, stop)
                i += 1
        if marker is not None:
            holders = self._marks.get(marker)
            if not holders:
                self._early.add((BATCH, marker))
                return
            # Markers sharing a first seq are told apart by nobody: settling the newest
            # segment's first means an older segment is only freed once all of them are.
            holders.pop().pending -= 1
            if not holders:
                del self._marks[marker]

    def freeable(self, *, active: bool = False) -> Segment | None:
        """The oldest segment if all of it is stored; the active one only if `active`."""
        if len(self.segments) > (0 if active else 1) and self.segments[0].pending <= 0:
            return self.segments[0]
        return None

    def reclaimable(self) -> bool:
        """The active segment alone is left, holds records, and all of them are stored."""
        active = self.segments[-1]
        return len(self.segments) == 1 and active.pending <= 0 and active.size > SEGMENT_HEADER.size

    def drop(self, seg: Segment) -> None:
        self.segments.remove(seg)
        self._by_seq = [(f, s) for f, s in self._by_seq if s is not seg]

    @property
    def oldest_seq(self) -> int:
        """The lowest data seq still in a segment (or one past the last written)."""
        return self._by_seq[0][0] if self._by_seq else self.written_seq + 1

    def plan(self, start: int, stop: int) -> list[tuple[Path, int, int]]:
        """The (path, offset, end) spans to read for the data seqs in [start, stop)."""
        return [
            (seg.path, seg.offset(start), seg.size)
            for seg in self.segments
            if seg.runs and seg.runs[0][0] < stop and seg.runs[-1][1] > start
        ]


def _runs(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """Ascending seqs as (start, stop) runs of consecutive ones."""
    if isinstance(seqs, range) and seqs.step == 1:
        return [(seqs.start, seqs.stop)]
    runs: list[list[int]] = []
    for seq in seqs:
        if runs and runs[-1][1] == seq:
            runs[-1][1] = seq + 1
        else:
            runs.append([seq, seq + 1])
    return [(start, stop) for start, stop in runs]
