"""metrics.Tally on its own: counts held as plain numbers until flush() (no server)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from fastingest import metrics


def test_tallies_hold_counts_until_flush():
    counter = Counter("tally_probe", "a test counter", registry=CollectorRegistry())
    tally = metrics.tally(counter)
    assert metrics.tally(counter) is tally  # one per counter, so flush() sees every count
    tally.n += 3
    metrics.add(counter, 2)  # the same tally
    assert counter._value.get() == 0
    metrics.flush()
    assert (counter._value.get(), tally.n) == (5, 0)
    metrics.flush()  # nothing new: nothing added twice
    assert counter._value.get() == 5
