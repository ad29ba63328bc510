"""The aiohttp front end (``--http aiohttp``): the same endpoints on aiohttp's web layer.

Slower per request than ``_protocol.py`` (see bench/README.md), and the reference
the lean front end is tested against: every server test runs on both (the lean one
compiled and as Python).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import http_exceptions, web

from fastingest import metrics
from fastingest.bodies import BodyError
from fastingest.endpoints import (
    INGEST_PATH,
    Answer,
    Endpoints,
    error,
    not_allowed,
    not_found,
    refusal,
    too_large,
)

log = logging.getLogger("fastingest.webapp")


class _BadRequests(logging.Filter):
    """aiohttp logs a traceback at ERROR for each malformed request it answers 400; a
    client's bad bytes are the client's problem, not the server's (the lean front end
    logs nothing for them either)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, http_exceptions.HttpProcessingError)


logging.getLogger("aiohttp.server").addFilter(_BadRequests())

ENDPOINTS: web.AppKey[Endpoints] = web.AppKey("endpoints", Endpoints)
MAX_HEADERS = 100  # header field lines, as on the lean front end
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def response(answer: Answer) -> web.Response:
    headers = dict(answer.headers)
    headers["Content-Type"] = answer.content_type
    return web.Response(status=answer.status, body=answer.body, headers=headers)


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count every answer by route and status; every error leaves as JSON."""
    answer: web.StreamResponse
    try:
        hosts = len(request.headers.getall("Host", ()))
        if hosts > 1 or (not hosts and request.version >= (1, 1)):  # RFC 9112 3.2
            answer = response(error(400, "bad_request", "a request needs exactly one Host header"))
            answer.force_close()
        else:
            answer = await handler(request)
    except web.HTTPException as exc:  # aiohttp's own: 404, 405, 413
        if exc.status < 400:
            raise
        answer = response(_http_error(request, exc))
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        answer = response(
            error(500, "internal_error", "the server failed on this request; it was not accepted")
        )
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    metrics.add(metrics.REQUESTS.labels(route, str(answer.status)))
    return answer


def _http_error(request: web.Request, exc: web.HTTPException) -> Answer:
    """aiohttp's own refusals, as the lean front end words them."""
    if exc.status == 413:
        return too_large(exc.text or "body too large")
    if exc.status == 404:
        return not_found(request.method, request.path)
    if exc.status == 405:
        return not_allowed(request.method, request.path, exc.headers.get("Allow", ""))
    code = exc.reason.lower().replace(" ", "_")
    return error(exc.status, code, f"{request.method} {request.path}: {exc.reason}")


async def ingest(request: web.Request) -> web.Response:
    endpoints = request.app[ENDPOINTS]
    try:
        ack = endpoints.check(request.headers, request.content_length)
    except BodyError as exc:
        return response(refusal(exc))
    size = request.content_length or 0
    if (busy := endpoints.reserve(size)) is not None:
        return response(refusal(busy))
    try:
        body = await request.read()  # over client_max_size: 413 through observe()
    finally:
        endpoints.release(size)
    answer = endpoints.ingest(request.headers, body, ack)
    return response(answer if isinstance(answer, Answer) else await answer)


async def healthz(request: web.Request) -> web.Response:
    return response(request.app[ENDPOINTS].health())


async def readyz(request: web.Request) -> web.Response:
    return response(request.app[ENDPOINTS].readiness())


async def metrics_page(request: web.Request) -> web.Response:
    return response(request.app[ENDPOINTS].metrics())


def make_app(endpoints: Endpoints) -> web.Application:
    app = web.Application(client_max_size=endpoints.max_body_bytes, middlewares=[observe])
    app[ENDPOINTS] = endpoints
    app.router.add_post(INGEST_PATH, ingest)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    return app


class WebFront:
    """aiohttp's runner and site behind the interface of ``protocol.LeanFront``."""

    def __init__(self, endpoints: Endpoints, *, keepalive_timeout: float, grace: float) -> None:
        # auto_decompress=False: bodies are inflated by bodies.decompress, under the size limit.
        self.runner = web.AppRunner(
            make_app(endpoints),
            auto_decompress=False,
            access_log=None,
            keepalive_timeout=keepalive_timeout,
            shutdown_timeout=grace,
            max_headers=MAX_HEADERS,
        )

    async def start(self, host: str, port: int, *, reuse_port: bool) -> int:
        """Listen (OSError if the address is taken); returns the bound port."""
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, backlog=1024, reuse_port=reuse_port)
        try:
            await site.start()
        except OSError:
            await self.runner.cleanup()
            raise
        return int(self.runner.addresses[0][1])

    async def close(self) -> None:
        """Stop listening, let in-flight requests finish for up to `grace` seconds."""
        await self.runner.cleanup()
