"""Run one server process: sink, pipeline, a front end, signals, and the drain.

The front end is ``lean.LeanFront`` (HTTP/1.1 on llhttp, the default) or
``aiohttp_front.AiohttpFront`` (aiohttp, ``--http aiohttp``); both answer from
``endpoints.Endpoints``, so the choice changes speed, not behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal

from fastingest import metrics
from fastingest.aiohttp_front import AiohttpFront
from fastingest.config import Settings
from fastingest.endpoints import Endpoints
from fastingest.lean import COMPILED, LeanFront
from fastingest.pipeline import Pipeline
from fastingest.sinks import Sink, open_sink

log = logging.getLogger("fastingest.server")

GAUGE_REFRESH_SECONDS = 1.0
MAX_GRACE_SECONDS = 5.0  # in-flight requests' time to finish at shutdown, before the drain


def make_front(settings: Settings, endpoints: Endpoints) -> LeanFront | AiohttpFront:
    grace = min(MAX_GRACE_SECONDS, settings.shutdown_timeout / 2)
    if settings.http == "aiohttp":
        return AiohttpFront(
            endpoints,
            keepalive_timeout=settings.keepalive_timeout,
            write_timeout=settings.request_timeout,
            grace=grace,
        )
    return LeanFront(
        endpoints,
        keepalive_timeout=settings.keepalive_timeout,
        request_timeout=settings.request_timeout,
        grace=grace,
    )


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then drain: stop accepting, finish, upload, return."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():  # a second signal must not cut the drain short and lose the queue
            log.warning(
                "%s again: still draining (up to %.0fs)", sig.name, settings.shutdown_timeout
            )
        stop.set()

    def caught(signum: int, frame: object) -> None:  # the main thread, between bytecodes
        loop.call_soon_threadsafe(on_signal, signal.Signals(signum))

    # Before anything else: a signal during start-up (or spool replay) must drain, not kill.
    # The handlers are the process's own, not the loop's: removing a loop's handler
    # restores the default action, and a signal in that moment would kill the process.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, caught)
    try:
        await _serve_until(stop, settings)
    finally:
        # The drain is over and the process only exits from here: a late signal (a second
        # SIGTERM, a supervisor's resend) must not turn a clean exit 0 into death by it.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)


async def _serve_until(stop: asyncio.Event, settings: Settings) -> None:
    loop = asyncio.get_running_loop()
    sink: Sink = open_sink(settings.sink_url, max_connections=settings.max_workers)
    await sink.start()
    pipeline = Pipeline(settings, sink)
    await pipeline.start()  # replays the spool before the first request
    front = make_front(settings, Endpoints(settings, pipeline, stop))
    host, port = settings.listen
    try:
        # A supervised worker shares the port with its siblings: the kernel spreads connections.
        bound = await front.start(host, port, reuse_port=settings.worker_index is not None)
    except OSError as exc:  # the port is taken: store what a spool replay queued, then say so
        await pipeline.stop(settings.shutdown_timeout)
        await sink.close()
        raise SystemExit(f"fastingest: cannot listen on {host}:{port}: {exc}") from None
    http = settings.http
    if http == "lean":
        http += " (compiled)" if COMPILED else " (python)"
    log.info(
        "fastingest%s listening on http://%s:%d/ingest; sink %r, mode %s, ack %s, "
        "%d workers, http %s",
        "" if settings.worker_index is None else f" worker {settings.worker_index}",
        host,
        bound,
        sink,
        settings.mode,
        settings.ack,
        settings.max_workers,
        http,
    )
    # What start-up made (modules, botocore's service models, the spool replay's records)
    # lives as long as the process: a full collection walking it holds the event loop for
    # tens of milliseconds, with every request in flight waiting. Leave it out of collections.
    gc.freeze()
    gauges = loop.create_task(_refresh_gauges(pipeline, stop))
    await stop.wait()
    await gauges
    started_at = loop.time()
    if settings.drain_delay > 0:  # /readyz already fails: let the load balancer notice
        log.info("draining: not ready, still serving for %.1fs", settings.drain_delay)
        await asyncio.sleep(settings.drain_delay)
    log.info("stopping: no new connections, finishing requests, draining the queue")
    await front.close()  # stop listening, let in-flight requests finish
    left = max(0.1, settings.shutdown_timeout - (loop.time() - started_at))
    await pipeline.stop(left)
    await sink.close()
    m = metrics
    log.info(
        "stopped: accepted %d payloads, uploaded %d in %d objects, dead-lettered %d, retries %d",
        m.total(m.PAYLOADS_ACCEPTED),
        m.total(m.PAYLOADS_UPLOADED),
        m.total(m.OBJECTS_UPLOADED),
        m.total(m.PAYLOADS_DEAD),
        m.total(m.UPLOAD_RETRIES),
    )


async def _refresh_gauges(pipeline: Pipeline, stop: asyncio.Event) -> None:
    # Under --processes another worker may answer /metrics: keep this one's numbers fresh.
    while not stop.is_set():
        pipeline.update_gauges()
        metrics.flush()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), GAUGE_REFRESH_SECONDS)
