"""HTTP front end: authenticate, decode, validate, enqueue, answer. Nothing slower.

``POST /ingest`` answers 202 once the request's payloads are in the intake
queue, 503 + Retry-After at once when the queue is full (never a wait, never
part of a request), and a precise 4xx with a JSON body for anything malformed.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from fastingest.bodies import BodyError, decompress, parse
from fastingest.config import Settings
from fastingest.errors import QueueClosed, QueueFull
from fastingest.pipeline import Pipeline
from fastingest.sinks import Sink, SinkError, open_sink

log = logging.getLogger("fastingest.server")

RETRY_AFTER_SECONDS = "1"
PIPELINE: web.AppKey[Pipeline] = web.AppKey("pipeline", Pipeline)
TOKENS: web.AppKey[list[bytes]] = web.AppKey("tokens", list)
SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)


def json_response(status: int, body: dict[str, object], **headers: str) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def error(status: int, code: str, detail: str, **headers: str) -> web.Response:
    return json_response(status, {"error": code, "detail": detail}, **headers)


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error leaves as JSON, aiohttp's own (404, 405, 413) included."""
    try:
        return await handler(request)
    except BodyError as exc:
        return json_response(exc.status, exc.body())
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        code = exc.reason.lower().replace(" ", "_")
        detail = f"{request.method} {request.path}: {exc.reason}"
        if exc.status == 413:
            code, detail = "body_too_large", exc.text or detail
        return error(exc.status, code, detail, **headers)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
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
    pipeline, tokens = request.app[PIPELINE], request.app[TOKENS]
    limit = request.app[SETTINGS].max_body_bytes
    if not pipeline.accepting:
        return error(
            503,
            "shutting_down",
            "this server is draining; retry elsewhere",
            **{"Retry-After": RETRY_AFTER_SECONDS},
        )
    bearer = None
    if tokens:
        auth = request.headers.get("Authorization", "")
        if auth:
            scheme, _, bearer = auth.partition(" ")
            if scheme.lower() != "bearer" or not _authorized(bearer.strip(), tokens):
                return _unauthorized("bad bearer token")
    if request.content_length is not None and request.content_length > limit:
        raise BodyError(
            413, "body_too_large", f"body of {request.content_length} bytes is over {limit}"
        )
    content_type = request.content_type if "Content-Type" in request.headers else ""
    body = decompress(await request.read(), request.headers.get("Content-Encoding", ""), limit)
    payloads = parse(body, content_type)
    if tokens and bearer is None and not _authorized(payloads.token, tokens):
        return _unauthorized("send Authorization: Bearer <token> or the collection's token field")
    try:
        pipeline.submit(payloads.chunk, payloads.count)
    except QueueFull:
        pipeline.counters.overloaded_requests += 1
        return error(
            503,
            "overloaded",
            "the ingest queue is full; retry after a moment",
            **{"Retry-After": RETRY_AFTER_SECONDS},
        )
    except QueueClosed:
        return error(
            503,
            "shutting_down",
            "this server is draining; retry elsewhere",
            **{"Retry-After": RETRY_AFTER_SECONDS},
        )
    return json_response(202, {"accepted": payloads.count})


def _unauthorized(detail: str) -> web.Response:
    return error(401, "unauthorized", detail, **{"WWW-Authenticate": 'Bearer realm="fastingest"'})


async def healthz(request: web.Request) -> web.Response:
    return json_response(200, {"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    pipeline = request.app[PIPELINE]
    if not pipeline.accepting:
        return error(503, "draining", "shutting down: not taking new requests")
    try:
        await pipeline.sink.check()
    except SinkError as exc:
        return error(503, "sink_unreachable", str(exc))
    return json_response(200, {"status": "ready", "queued_requests": pipeline.intake.qsize()})


def make_app(settings: Settings, pipeline: Pipeline) -> web.Application:
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[json_errors])
    app[PIPELINE] = pipeline
    app[TOKENS] = [t.encode() for t in settings.tokens()]
    app[SETTINGS] = settings
    app.router.add_post("/ingest", ingest)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def serve(settings: Settings, *, started: Callable[[int], None] | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain: stop accepting, finish, upload, return."""
    sink: Sink = open_sink(settings.sink_url, max_connections=settings.max_workers)
    await sink.start()
    pipeline = Pipeline(settings, sink)
    pipeline.start()
    # auto_decompress=False: bodies are inflated by bodies.decompress, under the size limit.
    runner = web.AppRunner(
        make_app(settings, pipeline),
        auto_decompress=False,
        access_log=None,
        shutdown_timeout=min(5.0, settings.shutdown_timeout / 2),
    )
    await runner.setup()
    host, port = settings.listen
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound = runner.addresses[0][1]
    log.info(
        "fastingest listening on http://%s:%d/ingest; sink %r, mode %s, %d workers",
        host,
        bound,
        sink,
        settings.mode,
        settings.max_workers,
    )
    if started is not None:
        started(bound)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():  # a second signal must not cut the drain short and lose the queue
            log.warning(
                "%s again: still draining (up to %.0fs)", sig.name, settings.shutdown_timeout
            )
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await stop.wait()
        started_at = loop.time()
        log.info("stopping: no new connections, finishing requests, draining the queue")
        await runner.cleanup()  # stop listening, let in-flight requests finish
        left = max(0.1, settings.shutdown_timeout - (loop.time() - started_at))
        await pipeline.stop(left)
        await sink.close()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    c = pipeline.counters
    log.info(
        "stopped: accepted %d payloads, uploaded %d in %d objects, dead-lettered %d, retries %s",
        c.accepted_payloads,
        c.uploaded_payloads,
        c.uploaded_objects,
        pipeline.dead_letter.payloads,
        dict(c.retries) or "none",
    )
