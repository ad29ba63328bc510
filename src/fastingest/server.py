"""HTTP front end: authenticate, decode, validate, enqueue, answer. Nothing slower.

``POST /ingest`` answers 202 once the request's payloads are taken at the ack
level asked for (in memory, fsynced to the spool, or stored in the sink), 503 +
Retry-After at once when the queue or spool is full (never a wait, never part of
a request), and a precise 4xx with a JSON body for anything malformed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from fastingest import metrics
from fastingest.bodies import BodyError, decompress, parse
from fastingest.config import ACK_LEVELS, Settings
from fastingest.errors import QueueClosed, QueueFull
from fastingest.idempotency import IdempotencyCache
from fastingest.pipeline import Pipeline
from fastingest.sinks import Sink, SinkError, open_sink
from fastingest.spool import SpoolError

log = logging.getLogger("fastingest.server")

RETRY_AFTER_SECONDS = "1"
GAUGE_REFRESH_SECONDS = 1.0
PIPELINE: web.AppKey[Pipeline] = web.AppKey("pipeline", Pipeline)
TOKENS: web.AppKey[list[bytes]] = web.AppKey("tokens", list)
SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)
IDEMPOTENCY: web.AppKey[IdempotencyCache] = web.AppKey("idempotency", IdempotencyCache)
STOPPING: web.AppKey[asyncio.Event] = web.AppKey("stopping", asyncio.Event)
ACK_HEADER = "X-Fastingest-Ack"


def json_response(
    status: int, body: dict[str, object], headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def error(status: int, code: str, detail: str, **headers: str) -> web.Response:
    return json_response(status, {"error": code, "detail": detail}, headers)


@web.middleware
async def observe(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Count every answer by route and status; every error leaves as JSON."""
    response = await _answer(request, handler)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    metrics.REQUESTS.labels(route, str(response.status)).inc()
    return response


async def _answer(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except BodyError as exc:
        metrics.ERRORS.labels(exc.error).inc()
        headers = {}
        if exc.status == 503:
            headers["Retry-After"] = RETRY_AFTER_SECONDS
        elif exc.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="fastingest"'
        return json_response(exc.status, exc.body(), headers)
    except web.HTTPException as exc:  # aiohttp's own: 404, 405, 413
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        code = exc.reason.lower().replace(" ", "_")
        detail = f"{request.method} {request.path}: {exc.reason}"
        if exc.status == 413:
            code, detail = "body_too_large", exc.text or detail
        metrics.ERRORS.labels(code).inc()
        return error(exc.status, code, detail, **headers)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        metrics.ERRORS.labels("internal_error").inc()
        return error(
            500, "internal_error", "the server failed on this request; it was not accepted"
        )


def _authorized(candidate: str | None, tokens: list[bytes]) -> bool:
    if not candidate:
        return False
    given = candidate.encode()
    ok = False
    for token in tokens:  # no early exit: time does not depend on which token matched
        ok |= hmac.compare_digest(given, token)
    return ok


async def ingest(request: web.Request) -> web.Response:
    key = request.headers.get("Idempotency-Key")
    if not key:
        return json_response(*await accept(request))
    cache = request.app[IDEMPOTENCY]
    if (first := cache.get(key)) is not None:
        status, body = await asyncio.shield(first)
        return json_response(status, body, {"Idempotent-Replayed": "true"})
    fut = cache.begin(key)
    answer = None
    try:
        answer = await accept(request)
    finally:
        cache.finish(key, fut, answer)
    return json_response(*answer)


async def accept(request: web.Request) -> tuple[int, dict[str, object]]:
    """Take one request's payloads; returns (status, body) or raises BodyError."""
    pipeline, tokens = request.app[PIPELINE], request.app[TOKENS]
    settings = request.app[SETTINGS]
    limit = settings.max_body_bytes
    ack = request.headers.get(ACK_HEADER, settings.ack).lower()
    if ack not in ACK_LEVELS:
        raise BodyError(400, "bad_ack", f"{ACK_HEADER} must be one of {', '.join(ACK_LEVELS)}")
    if not pipeline.accepting:  # before reading a body that could not be taken
        raise _draining()
    bearer = None
    if tokens:
        auth = request.headers.get("Authorization", "")
        if auth:
            scheme, _, bearer = auth.partition(" ")
            if scheme.lower() != "bearer" or not _authorized(bearer.strip(), tokens):
                raise BodyError(401, "unauthorized", "bad bearer token")
    if request.content_length is not None and request.content_length > limit:
        raise BodyError(
            413, "body_too_large", f"body of {request.content_length} bytes is over {limit}"
        )
    content_type = request.content_type if "Content-Type" in request.headers else ""
    raw = await request.read()
    metrics.BYTES_IN.inc(len(raw))
    body = decompress(raw, request.headers.get("Content-Encoding", ""), limit)
    payloads = parse(body, content_type)
    if tokens and bearer is None and not _authorized(payloads.token, tokens):
        raise BodyError(
            401,
            "unauthorized",
            "send Authorization: Bearer <token> or the collection's token field",
        )
    try:
        ticket, stored = pipeline.submit(
            payloads.chunk, payloads.count, want_upload=ack == "uploaded"
        )
    except QueueFull:
        raise BodyError(
            503, "overloaded", "the ingest queue is full; retry after a moment"
        ) from None
    except QueueClosed:
        raise _draining() from None
    except SpoolError as exc:
        raise BodyError(503, "spool_unavailable", str(exc)) from None
    answer: dict[str, object] = {"accepted": payloads.count, "ack": ack}
    if ack == "received":
        return 202, answer
    try:
        await pipeline.durable(ticket)
    except SpoolError as exc:
        # Already in the memory queue, so it may still be delivered: at least once, not lost.
        raise BodyError(503, "spool_unavailable", str(exc)) from None
    if stored is not None and not await stored:
        answer.update(ack="durable", dead_lettered=True)
    return 202, answer


def _draining() -> BodyError:
    return BodyError(503, "shutting_down", "this server is draining; retry elsewhere")


async def healthz(request: web.Request) -> web.Response:
    return json_response(200, {"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    pipeline = request.app[PIPELINE]
    if request.app[STOPPING].is_set() or not pipeline.accepting:
        return error(503, "draining", "shutting down: not taking new requests")
    try:
        await pipeline.sink.check()
    except SinkError as exc:
        return error(503, "sink_unreachable", str(exc))
    return json_response(200, {"status": "ready", "queued_requests": pipeline.intake.qsize()})


async def metrics_endpoint(request: web.Request) -> web.Response:
    request.app[PIPELINE].update_gauges()
    body, content_type = metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})


def make_app(settings: Settings, pipeline: Pipeline, stopping: asyncio.Event) -> web.Application:
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[observe])
    app[STOPPING] = stopping
    app[PIPELINE] = pipeline
    app[TOKENS] = [t.encode() for t in settings.tokens()]
    app[SETTINGS] = settings
    app[IDEMPOTENCY] = IdempotencyCache(settings.idempotency_window)
    app.router.add_post("/ingest", ingest)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    return app


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

    # Before anything else: a signal during start-up (or spool replay) must drain, not kill.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await _serve_until(stop, settings)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _serve_until(stop: asyncio.Event, settings: Settings) -> None:
    loop = asyncio.get_running_loop()
    sink: Sink = open_sink(settings.sink_url, max_connections=settings.max_workers)
    await sink.start()
    pipeline = Pipeline(settings, sink)
    await pipeline.start()  # replays the spool before the first request
    # auto_decompress=False: bodies are inflated by bodies.decompress, under the size limit.
    runner = web.AppRunner(
        make_app(settings, pipeline, stop),
        auto_decompress=False,
        access_log=None,
        shutdown_timeout=min(5.0, settings.shutdown_timeout / 2),
    )
    await runner.setup()
    host, port = settings.listen
    # A supervised worker shares the port with its siblings: the kernel spreads connections.
    site = web.TCPSite(
        runner, host, port, backlog=1024, reuse_port=settings.worker_index is not None
    )
    try:
        await site.start()
    except OSError as exc:  # the port is taken: store what a spool replay queued, then say so
        await runner.cleanup()
        await pipeline.stop(settings.shutdown_timeout)
        await sink.close()
        raise SystemExit(f"fastingest: cannot listen on {host}:{port}: {exc}") from None
    log.info(
        "fastingest%s listening on http://%s:%d/ingest; sink %r, mode %s, ack %s, %d workers",
        "" if settings.worker_index is None else f" worker {settings.worker_index}",
        host,
        runner.addresses[0][1],
        sink,
        settings.mode,
        settings.ack,
        settings.max_workers,
    )
    gauges = loop.create_task(_refresh_gauges(pipeline, stop))
    await stop.wait()
    await gauges
    started_at = loop.time()
    if settings.drain_delay > 0:  # /readyz already fails: let the load balancer notice
        log.info("draining: not ready, still serving for %.1fs", settings.drain_delay)
        await asyncio.sleep(settings.drain_delay)
    log.info("stopping: no new connections, finishing requests, draining the queue")
    await runner.cleanup()  # stop listening, let in-flight requests finish
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
    # Under --processes another worker may answer /metrics: keep this one's gauges fresh.
    while not stop.is_set():
        pipeline.update_gauges()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), GAUGE_REFRESH_SECONDS)
