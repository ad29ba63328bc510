"""Prometheus metrics: the one place the service counts what it does.

Under ``--processes N`` the supervisor gives its workers a shared
``PROMETHEUS_MULTIPROC_DIR`` (set before prometheus_client is imported), so
whichever worker answers ``GET /metrics`` reports the sum over all of them.

Reconciliation, at every moment: ``payloads_accepted + payloads_replayed ==
payloads_uploaded + payloads_dead_lettered + payloads_withdrawn + payloads_held``;
``payloads_durable`` counts what reached the spool's disk.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

REQUESTS = Counter(
    "fastingest_requests", "HTTP requests answered, by route and status", ["route", "status"]
)
ERRORS = Counter("fastingest_request_errors", "refused requests, by error code", ["error"])
BYTES_IN = Counter("fastingest_bytes_in", "request body bytes received, as sent")
PAYLOADS_ACCEPTED = Counter("fastingest_payloads_accepted", "payloads acknowledged")
PAYLOADS_DURABLE = Counter("fastingest_payloads_durable", "accepted payloads fsynced to the spool")
PAYLOADS_REPLAYED = Counter(
    "fastingest_payloads_replayed", "payloads taken from the spool of an earlier run"
)
PAYLOADS_UPLOADED = Counter("fastingest_payloads_uploaded", "payloads stored in the sink")
PAYLOADS_DEAD = Counter(
    "fastingest_payloads_dead_lettered", "payloads written to the dead-letter directory"
)
OBJECTS_UPLOADED = Counter("fastingest_objects_uploaded", "objects (batches) stored in the sink")
OBJECTS_DEAD = Counter("fastingest_objects_dead_lettered", "objects in the dead-letter directory")
BYTES_OUT = Counter("fastingest_bytes_out", "object bytes stored in the sink (compressed)")
UPLOAD_RETRIES = Counter(
    "fastingest_upload_retries", "upload attempts retried, by error class", ["error"]
)
UPLOAD_SECONDS = Histogram(
    "fastingest_upload_seconds",
    "time to store one object, retries included",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
QUEUE_REQUESTS = Gauge(
    "fastingest_queue_requests", "requests in the intake queue", multiprocess_mode="livesum"
)
QUEUE_PAYLOADS = Gauge(
    "fastingest_queue_payloads", "payloads in the intake queue", multiprocess_mode="livesum"
)
BATCHES_CLOSED = Counter("fastingest_batches_closed", "batches closed (each becomes one object)")
PARTITIONS_CLOSED_EARLY = Counter(
    "fastingest_partitions_closed_early",
    "partitions' batches closed before their thresholds: too many partitions or bytes open",
)
EVENT_TIME_FALLBACKS = Counter(
    "fastingest_event_time_fallbacks",
    "payloads partitioned by arrival time: their --time-field was missing or unreadable",
)
PAYLOADS_UNCONVERTED = Counter(
    "fastingest_payloads_unconverted",
    "payloads stored under format-conversion-failed/: they did not fit the Parquet schema",
)
QUEUE_BYTES = Gauge(
    "fastingest_queue_bytes", "payload bytes in the intake queue", multiprocess_mode="livesum"
)
SPOOL_BYTES = Gauge(
    "fastingest_spool_bytes", "bytes in spool segment files", multiprocess_mode="livesum"
)
SPOOL_SEGMENTS = Gauge(
    "fastingest_spool_segments", "spool segment files", multiprocess_mode="livesum"
)
PAYLOADS_WITHDRAWN = Counter(
    "fastingest_payloads_withdrawn",
    "payloads answered 503 after their spool write failed, taken out of the queue",
)
OBJECTS_ALREADY_STORED = Counter(
    "fastingest_objects_already_stored",
    "objects found in the sink under their key already (stored before a restart)",
)
SINK_UP = Gauge(
    "fastingest_sink_up",
    "1 while objects reach the sink, 0 while delivery is stalled",
    multiprocess_mode="livemin",
)
UNSTORED_OLDEST = Gauge(
    "fastingest_unstored_oldest_seconds",
    "age of the oldest payload waiting for the sink (0 when none waits)",
    multiprocess_mode="livemax",
)
BACKLOG_OBJECTS = Gauge(
    "fastingest_delivery_backlog_objects",
    "closed objects waiting in the spool for the sink to answer",
    multiprocess_mode="livesum",
)
BACKLOG_BYTES = Gauge(
    "fastingest_delivery_backlog_bytes",
    "uncompressed payload bytes of the objects waiting for the sink",
    multiprocess_mode="livesum",
)
PAYLOADS_HELD = Gauge(
    "fastingest_payloads_held",
    "payloads accepted or replayed, not yet uploaded or dead-lettered",
    multiprocess_mode="livesum",
)


# Counts made on the event loop for every request wait in a Tally as a plain number: a
# Prometheus increment takes a lock, and under --processes writes to an mmap, several
# times per request. A hot path keeps its counter's Tally and adds to ``n``: an
# attribute increment, a fraction of a call to add(). flush() hands the
# numbers over: the batcher does at every round (so a payload is counted as accepted
# before it can be counted as uploaded), the server every second and at exit, and
# every exposition before it renders.
class Tally:
    __slots__ = ("counter", "n")

    def __init__(self, counter: Any) -> None:
        self.counter = counter
        self.n: float = 0


_tallies: dict[Any, Tally] = {}


def tally(counter: Any) -> Tally:
    """The Tally of `counter` (a Counter, or a labelled child): one per counter."""
    found = _tallies.get(counter)
    if found is None:
        found = _tallies[counter] = Tally(counter)
    return found


def add(counter: Any, amount: float = 1.0) -> None:
    """Add `amount` to `counter` at the next flush() (off the hot paths, which keep a Tally)."""
    tally(counter).n += amount


def flush() -> None:
    for t in _tallies.values():
        if t.n:
            amount, t.n = t.n, 0
            t.counter.inc(amount)


def total(counter: Counter) -> float:
    """This process's total of `counter`, over all its labels."""
    flush()
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))


def exposition() -> tuple[bytes, str]:
    """The text format for GET /metrics: this process, or every worker under --processes."""
    flush()
    if MULTIPROCESS:
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
