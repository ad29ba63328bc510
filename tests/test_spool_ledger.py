"""The spool's ledger on its own: where each record lives and when a segment may go."""

from __future__ import annotations

from pathlib import Path

from fastingest.spool_ledger import Ledger, Segment
from fastingest.spool_records import SEGMENT_HEADER


def segment(ledger: Ledger, name: str) -> Segment:
    seg = Segment(Path(name), 1, SEGMENT_HEADER.size)
    ledger.begin(seg)
    return seg


def write(ledger: Ledger, seg: Segment, data: list[int], markers: list[int] = []) -> None:  # noqa: B006
    ledger.wrote(seg, data, markers)
    seg.size += 100 * (len(data) + len(markers))


def test_a_range_stored_across_segments_frees_them_oldest_first() -> None:
    ledger = Ledger()
    a, b = segment(ledger, "a"), segment(ledger, "b")
    write(ledger, a, list(range(0, 10)))
    write(ledger, b, list(range(10, 20)))
    c = segment(ledger, "c")  # the active one
    assert ledger.freeable() is None
    ledger.stored(range(5, 15))
    assert (a.pending, b.pending) == (5, 5) and ledger.freeable() is None
    ledger.stored(range(15, 20))  # b is all stored, but a, older, is not
    assert b.pending == 0 and ledger.freeable() is None
    ledger.stored(range(0, 5))
    assert ledger.freeable() is a
    ledger.drop(a)
    assert ledger.freeable() is b
    ledger.drop(b)
    assert ledger.freeable() is None  # never the active segment
    assert ledger.freeable(active=True) is c  # at close, it may go too
    assert ledger.oldest_seq == 20  # nothing left: one past the last written


def test_a_marker_keeps_its_segment_until_its_batch_is_stored() -> None:
    ledger = Ledger()
    a = segment(ledger, "a")
    write(ledger, a, [0, 1, 2], markers=[0])
    segment(ledger, "b")
    ledger.stored([0, 1, 2])
    assert a.pending == 1 and ledger.freeable() is None
    ledger.stored([], marker=0)
    assert ledger.freeable() is a


def test_markers_sharing_a_first_seq_free_the_older_segment_only_once_all_are_stored() -> None:
    # Partitions' batches that opened on the same chunk: nothing tells their markers apart.
    ledger = Ledger()
    a = segment(ledger, "a")
    write(ledger, a, [0], markers=[0])
    b = segment(ledger, "b")
    write(ledger, b, [], markers=[0])
    segment(ledger, "c")
    ledger.stored([0])
    ledger.stored([], marker=0)  # whichever of the two it was, "a" keeps the other's
    assert (a.pending, b.pending) == (1, 0) and ledger.freeable() is None
    ledger.stored([], marker=0)
    assert ledger.freeable() is a


def test_what_is_stored_before_it_is_written_is_not_left_pending() -> None:
    ledger = Ledger()
    a = segment(ledger, "a")
    write(ledger, a, [0, 1])
    ledger.stored(range(0, 4), marker=0)  # 2, 3 and the marker are still in the write buffer
    write(ledger, a, [2, 3], markers=[0])
    write(ledger, a, [4])
    assert a.pending == 1
    assert ledger.reclaimable() is False
    ledger.stored([4])
    assert ledger.reclaimable() is True  # alone, written to, all of it stored


def test_refused_seqs_leave_gaps_that_settle_as_runs() -> None:
    ledger = Ledger()
    a = segment(ledger, "a")
    write(ledger, a, [0, 1, 3, 4, 7])  # 2, 5 and 6 were refused
    assert a.runs == [[0, 2], [3, 5], [7, 8]]
    ledger.stored([0, 1, 3, 4, 7])
    assert a.pending == 0


def test_reads_are_planned_only_in_segments_that_hold_the_range() -> None:
    ledger = Ledger()
    a, b, c = segment(ledger, "a"), segment(ledger, "b"), segment(ledger, "c")
    write(ledger, a, list(range(0, 10)))
    write(ledger, b, list(range(10, 20)))
    write(ledger, c, list(range(20, 30)))
    assert [path.name for path, _, _ in ledger.plan(12, 22)] == ["b", "c"]
    assert ledger.written_seq == 29 and ledger.oldest_seq == 0
