"""What each endpoint answers, whichever HTTP layer carried the request.

Both front ends (``_lean.py`` on llhttp, ``aiohttp_front.py`` on aiohttp) route here,
so a request gets the same answer, byte for byte, from either. Headers arrive as a
mapping looked up by lower-case name; bodies arrive whole.

``POST /ingest`` answers 202 once the request's payloads are taken at the ack
level asked for (in memory, fsynced to the spool, or stored in the sink), 503 +
Retry-After at once when the queue or spool is full (never a wait), and a precise
4xx with a JSON body for anything malformed.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import re
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, NamedTuple

import orjson

from fastingest import metrics
from fastingest.bodies import BodyError, Payloads, decompress, parse
from fastingest.config import ACK_LEVELS, Settings
from fastingest.errors import QueueClosed, QueueFull, Refusal
from fastingest.idempotency import IdempotencyCache
from fastingest.pipeline import Pipeline
from fastingest.spool import SpoolError

Headers = Mapping[str, str]  # looked up by lower-case name
JSON = "application/json"
RETRY_AFTER_SECONDS = "1"
ACK_HEADER = "X-Fastingest-Ack"
INGEST_PATH = "/ingest"
# The pages, answered at once from the server's state: path -> the Endpoints method.
PAGES = {"/healthz": "health", "/readyz": "readiness", "/metrics": "metrics"}
# The route table both front ends serve: path -> the methods it takes.
ROUTES: dict[str, tuple[str, ...]] = {
    INGEST_PATH: ("POST",),
    **{path: ("GET", "HEAD") for path in PAGES},
}
MAX_IDEMPOTENCY_KEY = 255
_IDEMPOTENCY_KEY = re.compile(rf"[\x20-\x7e]{{1,{MAX_IDEMPOTENCY_KEY}}}")
METRICS_TTL = 0.5  # seconds a rendered /metrics page is served again: a scrape costs a render
# The fields an answer depends on may appear once: two would be read differently by
# different parsers (one front end joins them, another takes the first).
SINGLE_FIELDS = frozenset(
    {
        "host",
        "authorization",
        "content-type",
        "content-encoding",
        "idempotency-key",
        "x-fastingest-ack",
        "expect",
    }
)


class Answer(NamedTuple):
    status: int
    body: bytes
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()


# What an endpoint returns: its answer, or one that comes later (a future completed by
# callbacks, or a coroutine for the front end to run as a task).
Pending = Answer | asyncio.Future[Answer] | Coroutine[Any, Any, Answer]


def json_answer(status: int, body: dict[str, Any], *headers: tuple[str, str]) -> Answer:
    return Answer(status, orjson.dumps(body), JSON, headers)


def error(status: int, code: str, detail: str, *headers: tuple[str, str]) -> Answer:
    metrics.ERRORS.labels(code).inc()
    if not detail.isascii():  # it may quote a header, which aiohttp decodes with surrogates
        detail = detail.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return json_answer(status, {"error": code, "detail": detail}, *headers)


def refusal(exc: Refusal) -> Answer:
    """A refused request as an answer, with the header its status calls for."""
    metrics.ERRORS.labels(exc.error).inc()
    headers: tuple[tuple[str, str], ...] = ()
    if exc.status == 503:
        headers = (("Retry-After", RETRY_AFTER_SECONDS),)
    elif exc.status == 401:
        headers = (("WWW-Authenticate", 'Bearer realm="fastingest"'),)
    return json_answer(exc.status, exc.body(), *headers)


def not_found(method: str, path: str) -> Answer:
    return error(404, "not_found", f"{method} {path}: Not Found")


def not_allowed(method: str, path: str, allow: str) -> Answer:
    detail = f"{method} {path}: Method Not Allowed"
    return error(405, "method_not_allowed", detail, ("Allow", allow))


def too_large(detail: str) -> Answer:
    return error(413, "body_too_large", detail)


def repeated(name: str) -> Answer:
    return error(400, "bad_request", f"the {name} header may appear only once")


def head_refusal(
    method: str, http11: bool, has_host: bool, transfer_encoding: str | None
) -> Answer | None:
    """What both front ends refuse from the request line and framing alone (RFC 9112),
    answered with ``Connection: close``; None if the head may be routed."""
    if method == "CONNECT":  # no tunnels here; what follows would be tunnel bytes
        return error(400, "bad_request", "CONNECT is not supported")
    if http11 and not has_host:
        return error(400, "bad_request", "a request needs exactly one Host header")
    if transfer_encoding is not None:
        if not http11:  # an HTTP/1.0 peer cannot mean chunked (as nginx answers)
            return error(400, "bad_request", "Transfer-Encoding needs HTTP/1.1")
        codings = [c.strip().lower() for c in transfer_encoding.split(",")]
        if codings[-1] != "chunked":  # the body's end could not be found (RFC 9112 6.3)
            return error(400, "bad_request", "chunked must be the last Transfer-Encoding")
        if len(codings) > 1:
            detail = f"Transfer-Encoding: {transfer_encoding} is not supported; send chunked"
            return error(501, "not_implemented", detail)
    return None


def draining() -> Refusal:
    return Refusal(503, "shutting_down", "this server is draining; retry elsewhere")


def media_type(content_type: str | None) -> str:
    """``application/json; charset=utf-8`` -> ``application/json``."""
    if content_type is None:
        return ""
    found = _MEDIA_TYPES.get(content_type)
    if found is None:  # the same few headers every time: work each out once
        found = content_type.partition(";")[0].strip().lower()
        if len(_MEDIA_TYPES) < 1024:
            _MEDIA_TYPES[content_type] = found
    return found


_MEDIA_TYPES: dict[str, str] = {}


def _authorized(candidate: str | None, tokens: list[bytes]) -> bool:
    if not candidate or not candidate.isascii():  # a header's non-ASCII bytes match no token
        return False
    given = candidate.encode()
    ok = False
    for token in tokens:  # no early exit: time does not depend on which token matched
        ok |= hmac.compare_digest(given, token)
    return ok


class Endpoints:
    """The answers of ``/ingest``, ``/healthz``, ``/readyz`` and ``/metrics``."""

    def __init__(self, settings: Settings, pipeline: Pipeline, stopping: asyncio.Event) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.stopping = stopping
        self.tokens = [t.encode() for t in settings.tokens()]
        self.idempotency = IdempotencyCache(settings.idempotency_window)
        self.max_body_bytes = settings.max_body_bytes
        self.unique_names = settings.duplicate_keys == "refuse"
        self.max_inflight_bytes = settings.max_inflight_bytes
        self.inflight = 0  # body bytes the front ends are receiving now, all connections
        self._bytes_in = metrics.tally(metrics.BYTES_IN)
        self._metrics_page: Answer | None = None
        self._metrics_at = 0.0
        self.pages: dict[str, Callable[[], Answer]] = {
            path: getattr(self, method) for path, method in PAGES.items()
        }

    # --- bodies in flight -------------------------------------------------------

    def reserve(self, size: int) -> Refusal | None:
        """Count `size` body bytes in flight; the 503 to answer instead if they do not fit."""
        if self.inflight + size > self.max_inflight_bytes and self.inflight:
            return Refusal(
                503,
                "overloaded",
                f"{self.inflight} request bytes are being received; retry after a moment",
            )
        self.inflight += size
        return None

    def release(self, size: int) -> None:
        self.inflight -= size

    # --- POST /ingest -----------------------------------------------------------

    def check(self, headers: Headers, content_length: int | None) -> str:
        """Refuse what can be refused before the body is read; returns the ack level."""
        ack = (headers.get("x-fastingest-ack") or self.settings.ack).lower()
        if ack not in ACK_LEVELS:
            raise Refusal(400, "bad_ack", f"{ACK_HEADER} must be one of {', '.join(ACK_LEVELS)}")
        if not self.pipeline.accepting:
            raise draining()
        if self.tokens and (auth := headers.get("authorization")):
            scheme, _, bearer = auth.partition(" ")
            if scheme.lower() != "bearer" or not _authorized(bearer.strip(), self.tokens):
                raise Refusal(401, "unauthorized", "bad bearer token")
        limit = self.max_body_bytes
        if content_length is not None and content_length > limit:
            detail = f"body of {content_length} bytes is over {limit}"
            raise BodyError(413, "body_too_large", detail)
        return ack

    def ingest(self, headers: Headers, body: bytes, ack: str) -> Pending:
        """Take a checked request's body: an answer now, or one to come (ack level, replay)."""
        if (key := headers.get("idempotency-key")) is not None:
            if not _IDEMPOTENCY_KEY.fullmatch(key):
                return error(
                    400,
                    "bad_idempotency_key",
                    f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} printable ASCII characters",
                )
            if self.tokens and not headers.get("authorization"):
                try:  # a replay answers from the cache: authorise before looking the key up
                    self._payloads(headers, body)
                except Refusal as exc:
                    return refusal(exc)
            return self._idempotent(key, headers, body, ack)
        return self._ingest(headers, body, ack)

    def _payloads(self, headers: Headers, raw: bytes) -> Payloads:
        """The body's payloads; Refusal if it is unreadable, or (401) if it must carry an
        accepted token and does not."""
        body = decompress(raw, headers.get("content-encoding", ""), self.max_body_bytes)
        payloads = parse(body, media_type(headers.get("content-type")), self.unique_names)
        if self.tokens and not headers.get("authorization"):
            if not _authorized(payloads.token, self.tokens):
                raise Refusal(
                    401,
                    "unauthorized",
                    "send Authorization: Bearer <token> or the collection's token field",
                )
        return payloads

    def _ingest(self, headers: Headers, body: bytes, ack: str) -> Answer | asyncio.Future[Answer]:
        try:
            count, ticket, stored = self._take(headers, body, ack)
        except Refusal as exc:
            return refusal(exc)
        if ack == "received":
            return _accepted(count, ack)
        # Answered by callbacks from the spool (and the upload), not by a task per request.
        answer: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self.pipeline.when_durable(ticket, functools.partial(_durable, answer, count, ack, stored))
        return answer

    def _take(
        self, headers: Headers, raw: bytes, ack: str
    ) -> tuple[int, int, asyncio.Future[bool] | None]:
        """Queue the body's payloads: their count, the spool ticket, the upload's future."""
        self._bytes_in.n += len(raw)
        payloads = self._payloads(headers, raw)
        try:
            ticket, stored = self.pipeline.submit(
                payloads.chunk,
                payloads.count,
                sync=ack != "received",
                want_upload=ack == "uploaded",
            )
        except QueueFull:
            raise Refusal(
                503, "overloaded", "the ingest queue is full; retry after a moment"
            ) from None
        except QueueClosed:
            raise draining() from None
        except SpoolError as exc:
            raise Refusal(503, "spool_unavailable", str(exc)) from None
        return payloads.count, ticket, stored

    async def _idempotent(self, key: str, headers: Headers, body: bytes, ack: str) -> Answer:
        cache = self.idempotency
        if (first := cache.get(key)) is not None:
            status, raw = await asyncio.shield(first)
            return Answer(status, raw, JSON, (("Idempotent-Replayed", "true"),))
        fut = cache.begin(key)
        answer: Answer | None = None
        try:
            pending = self._ingest(headers, body, ack)
            answer = pending if isinstance(pending, Answer) else await pending
        finally:
            cache.finish(key, fut, None if answer is None else (answer.status, answer.body))
        return answer

    # --- GET /healthz, /readyz, /metrics ------------------------------------------

    def health(self) -> Answer:
        return json_answer(200, {"status": "ok"})

    def readiness(self) -> Answer:
        """Ready while requests can be taken and durably held, whatever the sink's state:
        during a sink outage the spool is the buffer, so the pod stays behind the Service."""
        pipeline = self.pipeline
        if self.stopping.is_set() or not pipeline.accepting:
            return error(503, "draining", "shutting down: not taking new requests")
        if (full := pipeline.unready()) is not None:
            return error(503, full, "the spool or the memory queue is full; retry shortly")
        delivery = pipeline.delivery
        body: dict[str, Any] = {
            "status": "ready",
            "queued_requests": pipeline.intake.qsize(),
            "sink": "failing" if delivery.failing else "up",
            "backlog_objects": len(delivery.backlog),
        }
        if delivery.failing:
            body["sink_error"] = delivery.last_error
        return json_answer(200, body)

    def metrics(self) -> Answer:
        """The exposition, rendered at most once per METRICS_TTL: a client that asks for it
        in a loop (or pipelines thousands of requests) costs a lookup, not a render each."""
        now = time.monotonic()
        if self._metrics_page is None or now - self._metrics_at >= METRICS_TTL:
            self.pipeline.update_gauges()
            body, content_type = metrics.exposition()
            self._metrics_page, self._metrics_at = Answer(200, body, content_type), now
        return self._metrics_page


def _durable(
    answer: asyncio.Future[Answer],
    count: int,
    ack: str,
    stored: asyncio.Future[bool] | None,
    failed: SpoolError | None,
) -> None:
    """The request's spool record is fsynced, or its write failed: answer, or await the upload."""
    if answer.done():  # cancelled: aiohttp cancels the handler of a client that left
        return
    if failed is not None:
        # The pipeline leaves the chunk out (see Spool.refused): the client sends it again.
        answer.set_result(refusal(Refusal(503, "spool_unavailable", str(failed))))
    elif stored is None:
        answer.set_result(_accepted(count, ack))
    else:
        stored.add_done_callback(functools.partial(_uploaded, answer, count))


def _uploaded(answer: asyncio.Future[Answer], count: int, stored: asyncio.Future[bool]) -> None:
    """Ack ``uploaded``: the chunk is in the sink (True) or the dead-letter directory (False)."""
    if answer.done():
        return
    if stored.result():
        answer.set_result(_accepted(count, "uploaded"))
    else:
        body = {"accepted": count, "ack": "durable", "dead_lettered": True}
        answer.set_result(json_answer(202, body))


_ACCEPTED: dict[tuple[int, str], Answer] = {}


def _accepted(count: int, ack: str) -> Answer:
    # The same few answers every time (1 or 10 payloads, one ack level): render each once.
    answer = _ACCEPTED.get((count, ack))
    if answer is None:
        answer = json_answer(202, {"accepted": count, "ack": ack})
        if len(_ACCEPTED) < 1024:
            _ACCEPTED[(count, ack)] = answer
    return answer
