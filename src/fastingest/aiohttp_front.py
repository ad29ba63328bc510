"""The aiohttp front end (``--http aiohttp``): the same endpoints on aiohttp's web layer.

Slower per request than the lean front end (``_lean.py``, see bench/README.md), and the
reference it is tested against: the HTTP, hostile-client and endpoint tests run on both
(the lean one compiled and as Python).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler

from fastingest import metrics
from fastingest.endpoints import (
    INGEST_PATH,
    SINGLE_FIELDS,
    Answer,
    Endpoints,
    error,
    head_refusal,
    not_allowed,
    not_found,
    refusal,
    repeated,
    too_large,
)
from fastingest.errors import Refusal

log = logging.getLogger("fastingest.aiohttp_front")


class _BadRequests(logging.Filter):
    """aiohttp logs a traceback at ERROR for each malformed request it answers 400, and
    for each client that leaves before its interim answer; a client's bad bytes or early
    close are the client's business, not the server's (the lean front end logs nothing
    for them either)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, (http_exceptions.HttpProcessingError, ConnectionError))


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
        if (refused := _head_refusal(request)) is not None:
            answer = response(refused)
            answer.force_close()
        else:
            answer = await handler(request)
    except web.HTTPException as exc:  # aiohttp's own: 404, 405, 413
        if exc.status < 400:
            raise
        answer = response(_http_error(request, exc))
    except ConnectionError:  # the client left mid-request: a cut request, not a failure
        answer = _client_left()
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        answer = response(
            error(500, "internal_error", "the server failed on this request; it was not accepted")
        )
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    metrics.add(metrics.REQUESTS.labels(route, str(answer.status)))
    return answer


def _client_left() -> web.Response:
    answer = response(error(400, "bad_request", "the connection closed before the request ended"))
    answer.force_close()
    return answer


def _head_refusal(request: web.Request) -> Answer | None:
    """The lean front end's checks of the head (llhttp makes some of them there)."""
    if request.version < (1, 0):  # aiohttp takes a request line without a version as 0.9
        return error(400, "bad_request", "the request line has no HTTP version")
    headers = request.headers
    for name in SINGLE_FIELDS:
        if len(headers.getall(name, ())) > 1:
            return repeated(name.title())
    return head_refusal(
        request.method,
        request.version >= (1, 1),
        "Host" in headers,
        headers.get("Transfer-Encoding"),
    )


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
    except Refusal as exc:
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


def _page(answer: Callable[[], Answer]) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def page(request: web.Request) -> web.Response:
        return response(answer())

    return page


async def expect(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue`` as aiohttp answers it; any other expectation 417, in JSON."""
    value = request.headers.get("Expect", "")
    if value.lower() != "100-continue":
        answer = response(error(417, "expectation_failed", f"Expect: {value} is not supported"))
        answer.force_close()
        metrics.add(metrics.REQUESTS.labels(request.path, "417"))
        return answer
    if request.version >= (1, 1):
        try:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        except ConnectionError:
            return _client_left()
        request.writer.output_size = 0  # the answer proper has not started
    return None


def make_app(endpoints: Endpoints) -> web.Application:
    app = web.Application(client_max_size=endpoints.max_body_bytes, middlewares=[observe])
    app[ENDPOINTS] = endpoints
    app.router.add_post(INGEST_PATH, ingest, expect_handler=expect)
    for path, page in endpoints.pages.items():  # GET, and HEAD with it, as ROUTES says
        app.router.add_get(path, _page(page), expect_handler=expect)
    return app


class _Connection(RequestHandler):
    """aiohttp's connection, answering as the lean front end does where aiohttp's own
    answer differs: a half-closed client still gets its answers, a request aiohttp's
    parser refuses gets the JSON error body, and a client that does not take its answers
    within the write timeout is cut off."""

    write_timeout = 30.0
    _stall: asyncio.TimerHandle | None = None

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall is None:
            loop = asyncio.get_running_loop()
            self._stall = loop.call_later(self.write_timeout, self._cut_off)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _cut_off(self) -> None:
        transport = self.transport
        if transport is not None:  # abort: a close would wait for the buffer to drain
            transport.abort()
        self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._stall is not None:
            self._stall.cancel()
        super().connection_lost(exc)

    def eof_received(self) -> bool:  # type: ignore[override]  # asyncio reads the result
        # aiohttp's state, read to tell whether a request is queued or being answered
        # (its handler waits on _waiter only while it has none).
        answering = self._messages or self._current_request is not None
        if not answering and (self._waiter is not None or not self._request_count):
            return False  # idle, or a head cut short: nothing to answer, close
        try:
            if self._parser is not None:
                self._parser.feed_eof()  # raises if a body was cut short
        except http_exceptions.HttpProcessingError:
            return False  # nothing to answer: close, and the handler sees the cut body
        self.close()  # no new requests; the ones read are answered, then the connection closes
        return True  # keep the transport open for those answers

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500 or not isinstance(exc, http_exceptions.HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        reason = (message or HTTPStatus(status).phrase).partition("\n")[0].rstrip(":")
        code = "bad_request" if status == 400 else HTTPStatus(status).phrase.lower()
        detail = f"malformed HTTP request: {reason}"
        answer = response(error(status, code.replace(" ", "_"), detail))
        answer.force_close()
        return answer


class _Server(web.Server):
    write_timeout = 30.0

    def __call__(self) -> RequestHandler:
        conn = _Connection(self, loop=self._loop, **self._kwargs)
        conn.write_timeout = self.write_timeout
        return conn


class _Runner(web.AppRunner):
    """AppRunner serving with _Connection: aiohttp has no public hook for the protocol."""

    write_timeout = 30.0

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        server = _Server(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            **made._kwargs,
        )
        server.write_timeout = self.write_timeout
        return server


class AiohttpFront:
    """aiohttp's runner and site behind the interface of ``lean.LeanFront``."""

    def __init__(
        self, endpoints: Endpoints, *, keepalive_timeout: float, write_timeout: float, grace: float
    ) -> None:
        # auto_decompress=False: bodies are inflated by bodies.decompress, under the size limit.
        self.runner = _Runner(
            make_app(endpoints),
            auto_decompress=False,
            access_log=None,
            keepalive_timeout=keepalive_timeout,
            shutdown_timeout=grace,
            max_headers=MAX_HEADERS,
        )
        self.runner.write_timeout = write_timeout

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
