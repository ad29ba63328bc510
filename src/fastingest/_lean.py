"""The lean front end (``--http lean``, the default): HTTP/1.1 on llhttp, no web framework.

aiohttp's web layer cost about half of the event loop per request (see
bench/README.md), so ``POST /ingest`` runs on an asyncio Protocol fed by the
llhttp parser (httptools); the answers come from ``endpoints.py``, the same as
on aiohttp. What the protocol owes HTTP/1.1:

- keep-alive, and pipelining: answers leave in request order; a read is parsed
  ``FEED_BYTES`` at a time and parsing yields to the loop once ``MAX_PIPELINED``
  answers were made in one turn; reading pauses while ``MAX_PIPELINED`` answers
  wait or while the client does not read its answers, and a connection whose
  answers are not taken within the request timeout is closed;
- chunked bodies (llhttp decodes them; other transfer codings get 501),
  ``Expect: 100-continue`` (answered only once the headers pass the checks that need
  no body, and after the answers before it), ``Connection: close`` (nothing is
  written after it), ``Upgrade`` (ignored: the request is read as HTTP/1.1), a client
  that half-closes after sending (it still gets its answers);
- limits: request head (431, chunked trailers included: they count against it and
  are never merged into the header fields), URL (414), body before and after
  inflation (413);
- timeouts: an idle keep-alive connection is closed, and a request whose head
  and body do not arrive in time gets 408 (slow clients hold no slot for ever).

A request refused before its body (auth, ack level, draining) is answered after
the body is read and dropped, so the connection stays usable; a body over the
limit, or a refusal of an ``Expect: 100-continue``, is answered at once and the
connection closed.

This file is compiled by Cython when the package is built: ``_lean.pxd`` declares
the three classes as extension types with C fields, which takes an eighth to a
quarter off the front end's own time per request (bench/README.md). Without a compiler, or with
``FASTINGEST_NO_EXTENSIONS=1``, it runs as Python; ``lean.py`` picks. Attributes
therefore have to be declared in the ``.pxd`` as well.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
from collections import deque
from http import HTTPStatus
from typing import cast

import httptools

from fastingest import metrics
from fastingest.endpoints import (
    INGEST_PATH,
    ROUTES,
    SINGLE_FIELDS,
    Answer,
    Endpoints,
    Pending,
    error,
    head_refusal,
    not_allowed,
    not_found,
    refusal,
    repeated,
    too_large,
)
from fastingest.errors import Refusal

log = logging.getLogger("fastingest.lean")

MAX_HEAD_BYTES = 64 * 1024  # request line and headers together
MAX_HEADERS = 100
MAX_URL_BYTES = 8 * 1024
MAX_PIPELINED = 32  # answers waiting, or made in one loop turn, before parsing stops
FEED_BYTES = 16 * 1024  # a read is parsed in slices this big, so a burst can be stopped
CHUNK_FRAMING = 32  # bytes a chunk's size line and CRLF may take beside its data
LINGER_SECONDS = 2.0  # after a refusal, how long what the client still sends is read and dropped
TICK_SECONDS = 1.0  # how often the Date header and the timeouts are refreshed
RENDERED_PER_TICK = 64  # distinct answers kept rendered until the Date changes

STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CONTINUE = Answer(100, b"")  # a slot holding the interim answer of a pipelined Expect


class _Refuse(Exception):
    """Raised from a parser callback: answer this, then close the connection."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer


class _Slot:
    """One request's place in the connection's answer order."""

    __slots__ = ("answer", "head", "keep_alive", "route")

    def __init__(self, route: str, keep_alive: bool, head: bool) -> None:
        self.answer: Answer | None = None
        self.route = route
        self.keep_alive = keep_alive
        self.head = head


class LeanFront:
    """Listens, keeps the connections, refreshes the Date header and enforces timeouts."""

    def __init__(
        self,
        endpoints: Endpoints,
        *,
        keepalive_timeout: float,
        request_timeout: float,
        grace: float,
    ) -> None:
        self.endpoints = endpoints
        self.grace = grace  # seconds in-flight requests get to finish at close()
        self.keepalive_timeout = keepalive_timeout
        self.request_timeout = request_timeout
        self.connections: set[Connection] = set()
        self.draining = False
        self.date = b""
        self._server: asyncio.Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._counters: dict[tuple[str, int], metrics.Tally] = {}
        self._outbox: list[Connection] = []
        self._rendered: dict[tuple[Answer, bool, bool], bytes] = {}

    async def start(self, host: str, port: int, *, reuse_port: bool) -> int:
        """Listen (OSError if the address is taken); returns the bound port."""
        loop = asyncio.get_running_loop()
        self._stamp()
        self._server = await loop.create_server(
            lambda: cast(asyncio.Protocol, Connection(self)),
            host,
            port,
            backlog=1024,
            reuse_port=reuse_port,
        )
        self._ticker = loop.create_task(self._tick(), name="fastingest-http-tick")
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening, close idle connections, let busy ones answer, then cut the rest."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close_if_idle()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()
        if self._ticker is not None:
            self._ticker.cancel()
        if self._server is not None:
            await self._server.wait_closed()

    def outbox(self, conn: Connection) -> None:
        """Write `conn`'s answers at the end of this loop turn, with everyone else's.

        One burst of writes per turn, not one write per answer as it is made: on a
        VM the wake-up of an idle reader costs more than the write itself, and a
        burst pays it once. Pipelined answers leave in a single write.
        """
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._send_all)
        self._outbox.append(conn)

    def _send_all(self) -> None:
        outbox, self._outbox = self._outbox, []
        for conn in outbox:
            conn.send_now()

    def count(self, route: str, status: int) -> None:
        counter = self._counters.get((route, status))
        if counter is None:  # labels() takes a lock and formats: once per (route, status)
            child = metrics.REQUESTS.labels(route, str(status))
            counter = self._counters[(route, status)] = metrics.tally(child)
        counter.n += 1

    def render(self, answer: Answer, keep_alive: bool, head: bool) -> bytes:
        """The answer's bytes on the wire; the few common ones are rendered once per tick."""
        key = (answer, keep_alive, head)
        data = self._rendered.get(key)
        if data is not None:
            return data
        body = answer.body
        parts = [
            STATUS_LINES[answer.status],
            b"Content-Type: ",
            answer.content_type.encode(),
            b"\r\nContent-Length: ",
            str(len(body)).encode(),
            b"\r\n",
            self.date,
        ]
        for name, value in answer.headers:
            parts += (name.encode("latin-1"), b": ", value.encode("latin-1"), b"\r\n")
        if not keep_alive:
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        if not head:
            parts.append(body)
        data = b"".join(parts)
        if len(self._rendered) < RENDERED_PER_TICK:
            self._rendered[key] = data
        return data

    def _stamp(self) -> None:
        self.date = b"Date: " + email.utils.formatdate(usegmt=True).encode() + b"\r\n"
        self._rendered.clear()  # they carry the old Date

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TICK_SECONDS)
            self._stamp()
            now = loop.time()
            for conn in list(self.connections):
                conn.expire(now)


def _absolute_path(url: bytes) -> bytes:
    """The path of an absolute-form target; _Refuse (400) for authority-form, "*" or junk."""
    if not url.lower().startswith((b"http://", b"https://")):
        raise _Refuse(error(400, "bad_request", "the request target must be a path or a URL"))
    try:
        return httptools.parse_url(url).path or b"/"
    except httptools.HttpParserInvalidURLError:
        raise _Refuse(error(400, "bad_request", "the request target is not a valid URL")) from None


class Connection:
    """One client connection: parse requests, route them, write answers in order."""

    def __init__(self, front: LeanFront) -> None:
        self.front = front
        self.endpoints = front.endpoints
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.answers: deque[_Slot] = deque()
        self.deadline = 0.0  # idle: keep-alive timeout; mid-request: request timeout
        self._paused: set[str] = set()  # why reading is paused: "pipeline", "writing"
        self._rest = b""  # received but not parsed yet: the burst stopped (see _feed)
        self._made = 0  # answers made by the current _feed: its per-turn bound
        self._stalled = 0.0  # when the client stopped taking its answers (pause_writing)
        self._upgrade: bytes | None = None  # an Upgrade request's head, to parse it again
        self._refused_at_once = False  # closing after a refusal: linger (see _linger)
        self._lingering = False
        self._done = False  # refused or failed: parse nothing more
        self._closing = False  # close once what is queued in _out is written
        self._out: list[bytes] = []  # answers for this loop turn's write
        self._in_head = True  # before a request's headers are complete
        self._head_bytes = 0  # received while the head was incomplete: bounds llhttp's buffer
        self._mid_request = False  # between a request's first byte and its end
        self._held = 0  # body bytes counted in the endpoints' in-flight budget
        self._reset()

    def _reset(self) -> None:
        if self._held:
            self.endpoints.release(self._held)
            self._held = 0
        self._sized = False  # its Content-Length was reserved whole
        self._fields = 0  # header field lines, repeated names included
        self._url = b""
        self._head_size = 0  # request line and headers, as parsed
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_size = 0
        self._after_head = 0  # bytes received since the head: body, chunk framing, trailer
        self._chunks = 0
        self._route = ""
        self._refused: Answer | None = None  # answered once its body has been read and dropped
        self._ack = ""
        self._head = False

    # --- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.front.connections.add(self)
        self.deadline = self.loop.time() + self.front.keepalive_timeout

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.connections.discard(self)
        self.transport = None
        self._done = True
        # The parser and this protocol refer to each other: free the request now, not at
        # the next cyclic GC, which large bodies alone do not trigger.
        self._reset()

    def pause_writing(self) -> None:  # the client is not reading its answers
        self._stalled = self.loop.time()
        self._pause("writing")

    def resume_writing(self) -> None:
        self._stalled = 0.0
        self._resume("writing")

    def eof_received(self) -> bool:
        """The client half-closed: answer what it sent, then close (never mid-answer)."""
        if self._lingering:
            return False  # it has read the answer: the transport closes
        self._done = True
        self._rest = b""
        if self.answers:
            self.answers[-1].keep_alive = False
        else:
            self._close()
        return True  # keep the transport open for the answers

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        if self._rest:  # reading was paused, but a transport may hand over one more read
            self._rest += data
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        """Parse `data` a slice at a time; past MAX_PIPELINED answers made in this turn,
        or once the client stops taking its answers, keep the rest for a later turn."""
        self._made = 0
        if len(data) <= FEED_BYTES:
            self._parse(data)
            return
        view = memoryview(data)
        end = len(data)
        for start in range(0, end, FEED_BYTES):
            if self._done:
                return
            if self._made >= MAX_PIPELINED or self._paused:
                self._rest = bytes(view[start:])
                if self.transport is not None:
                    self.transport.pause_reading()
                if not self._paused:  # else the _resume that ends the pause goes on
                    self.loop.call_soon(self._continue)
                return
            self._parse(bytes(view[start : start + FEED_BYTES]))

    def _parse(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        elif self._mid_request:
            self._after_head += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Refuse):
                self._refuse(cause.answer)
            else:
                log.error("HTTP callback failed", exc_info=cause)
                self._refuse(error(500, "internal_error", "the server failed on this request"))
            return
        except httptools.HttpParserUpgrade as exc:
            head, self._upgrade = self._upgrade, None
            if head is None:  # not one of ours: stop here, after the answers so far
                self._refuse(None)
                return
            # No protocol switch (RFC 9110 7.8 lets a server ignore Upgrade): llhttp
            # stopped before the body, so parse the request again without it.
            self.parser = httptools.HttpRequestParser(self)
            self._parse(head + data[exc.args[0] :])
            return
        except httptools.HttpParserError as exc:
            self._refuse(error(400, "bad_request", f"malformed HTTP request: {exc}"))
            return
        if self._in_head and self._head_bytes > MAX_HEAD_BYTES:
            self._refuse(error(431, "headers_too_large", f"request head over {MAX_HEAD_BYTES}"))
        elif (
            self._mid_request
            and self._after_head - self._body_size - CHUNK_FRAMING * self._chunks > MAX_HEAD_BYTES
        ):  # what is neither body nor framing is a trailer: llhttp buffers its fields
            self._refuse(error(431, "headers_too_large", "chunked trailer over the head limit"))

    # --- llhttp callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset()
        self._mid_request = True
        self.deadline = self.loop.time() + self.front.request_timeout

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if len(self._url) > MAX_URL_BYTES:
            raise _Refuse(error(414, "url_too_long", f"URL over {MAX_URL_BYTES} bytes"))

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_HEAD_BYTES:
            raise _Refuse(error(431, "headers_too_large", f"request head over {MAX_HEAD_BYTES}"))
        if not self._in_head:  # a chunked trailer: decides nothing (RFC 9110 6.5.1)
            return
        self._fields += 1
        if self._fields > MAX_HEADERS:
            raise _Refuse(error(431, "headers_too_large", f"more than {MAX_HEADERS} headers"))
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        if key in headers:
            if key in SINGLE_FIELDS:
                raise _Refuse(repeated(name.decode("latin-1")))
            headers[key] = f"{headers[key]}, {text}"
        else:
            headers[key] = text

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self.parser
        method = parser.get_method().decode()
        self._head = method == "HEAD"
        headers = self._headers
        te = headers.get("transfer-encoding")
        if te is not None or "host" not in headers or method == "CONNECT":  # rare: check
            http11 = parser.get_http_version() != "1.0"
            refused = head_refusal(method, http11, "host" in headers, te)
            if refused is not None:
                raise _Refuse(refused)
        if "upgrade" in headers and parser.should_upgrade():
            self._upgrade = self._without_upgrade(method)
            return
        url = self._url
        if url[:1] == b"/":
            raw_path = url.partition(b"?")[0]
        else:  # absolute-form (RFC 9112 3.2.2: a server must take it), or not a target at all
            raw_path = _absolute_path(url)
        path = raw_path.decode("latin-1")
        allowed = ROUTES.get(path)
        self._route = path if allowed else "unmatched"
        expect = headers.get("expect")
        if allowed is None:
            self._refused = not_found(method, path)
        elif method not in allowed:
            self._refused = not_allowed(method, path, ", ".join(allowed))
        elif path == INGEST_PATH:
            length = headers.get("content-length")
            try:
                self._ack = self.endpoints.check(headers, int(length) if length else None)
                if length and (busy := self.endpoints.reserve(int(length))) is not None:
                    raise busy
            except Refusal as exc:
                if exc.status == 413 or expect:  # no point reading a body we cannot take
                    raise _Refuse(refusal(exc)) from None
                self._refused = refusal(exc)
            else:
                if length:
                    self._held, self._sized = int(length), True
        if expect is not None:
            if expect.lower() != "100-continue":
                detail = f"Expect: {expect} is not supported"
                raise _Refuse(error(417, "expectation_failed", detail))
            if self._refused is not None:
                raise _Refuse(self._refused)
            if parser.get_http_version() != "1.0":
                if self.answers:  # after the answers before it, in order
                    slot = _Slot("", True, False)
                    slot.answer = _CONTINUE
                    self.answers.append(slot)
                else:
                    self._send(CONTINUE)

    def _without_upgrade(self, method: str) -> bytes:
        """This request's head with Upgrade and its Connection token taken out."""
        lines = [b"%s %s HTTP/1.1\r\n" % (method.encode(), self._url)]
        for name, value in self._headers.items():
            if name == "upgrade":
                continue
            if name == "connection":
                tokens = [t for t in value.split(",") if t.strip().lower() != "upgrade"]
                if not tokens:
                    continue
                value = ",".join(tokens)
            lines.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
        lines.append(b"\r\n")
        return b"".join(lines)

    def on_chunk_header(self) -> None:
        self._chunks += 1

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self.endpoints.max_body_bytes:
            raise _Refuse(too_large(f"body over {self.endpoints.max_body_bytes} bytes"))
        if self._refused is None:
            if not self._sized:  # chunked: counted as it comes
                if (busy := self.endpoints.reserve(len(body))) is not None:
                    raise _Refuse(refusal(busy))
                self._held += len(body)
            self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._mid_request = False
        self.deadline = self.loop.time() + self.front.keepalive_timeout
        if self._upgrade is not None:  # parsed again, body included (see _parse)
            return
        self._made += 1
        keep_alive = self.parser.should_keep_alive()
        route = self._route
        answer: Pending
        if self._refused is not None:
            answer = self._refused
        elif route == INGEST_PATH:
            body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
            self._body = []  # the only copy is the one the pipeline may keep
            self.endpoints.release(self._held)  # from here the intake's bounds hold it
            self._held = 0
            answer = self.endpoints.ingest(self._headers, body, self._ack)
        else:
            answer = self.endpoints.pages[route]()
        self._reply(answer, route, keep_alive, self._head)

    # --- answers, in request order ----------------------------------------------------

    def _reply(self, answer: Pending, route: str, keep_alive: bool, head: bool) -> None:
        if self._closing:  # an answer with "Connection: close" went before: nothing follows
            return
        if isinstance(answer, Answer) and not self.answers:  # the fast path: nothing before it
            self._write(answer, route, keep_alive, head)
            return
        slot = _Slot(route, keep_alive, head)
        self.answers.append(slot)
        if isinstance(answer, Answer):
            slot.answer = answer
        else:
            later = answer if isinstance(answer, asyncio.Future) else self.loop.create_task(answer)
            later.add_done_callback(functools.partial(self._settled, slot))
        if len(self.answers) >= MAX_PIPELINED:
            self._pause("pipeline")

    def _settled(self, slot: _Slot, later: asyncio.Future[Answer]) -> None:
        if later.cancelled():
            slot.answer = error(503, "shutting_down", "the server stopped before answering")
        elif (exc := later.exception()) is not None:
            log.error("unhandled error on %s", slot.route, exc_info=exc)
            slot.answer = error(500, "internal_error", "the server failed on this request")
        else:
            slot.answer = later.result()
        self._flush()

    def _flush(self) -> None:
        answers = self.answers
        while answers and (answer := answers[0].answer) is not None:
            slot = answers.popleft()
            if answer is _CONTINUE:
                self._send(CONTINUE)
                continue
            self._write(answer, slot.route, slot.keep_alive, slot.head)
            if self._closing:
                answers.clear()  # "Connection: close" is on its way: nothing may follow it
                return
        if len(answers) < MAX_PIPELINED // 2:
            self._resume("pipeline")

    def _write(self, answer: Answer, route: str, keep_alive: bool, head: bool) -> None:
        front = self.front
        front.count(route, answer.status)
        if self.transport is None:  # the client left; what it sent was still taken
            return
        keep_alive = keep_alive and not front.draining
        self._send(front.render(answer, keep_alive, head))
        if not keep_alive:
            self._close()

    def _send(self, data: bytes) -> None:
        if not self._out:
            self.front.outbox(self)
        self._out.append(data)

    def send_now(self) -> None:
        """Called by the front once per loop turn: one write for everything queued."""
        out, self._out = self._out, []
        if self.transport is None:
            return
        self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        if self._closing:
            self._end()

    # --- ending -------------------------------------------------------------------------

    def _refuse(self, answer: Answer | None) -> None:
        """Parse nothing more; answer what came before, then `answer`, then close."""
        self._done = self._refused_at_once = True
        self._rest = b""
        if self._closing:  # the last answer said "Connection: close": nothing may follow
            return
        if self.transport is not None:
            self.transport.pause_reading()
        if answer is not None:
            slot = _Slot(self._route or "unmatched", False, self._head)
            slot.answer = answer
            self.answers.append(slot)
        elif not self.answers:
            self._close()
            return
        else:
            self.answers[-1].keep_alive = False
        self._flush()

    def _close(self) -> None:
        self._done = self._closing = True
        if self.transport is not None and not self._out:  # else send_now() closes
            self._end()

    def _end(self) -> None:
        if self.transport is None:
            return
        if self._refused_at_once and self.transport.can_write_eof():
            self._linger()
        else:
            self.transport.close()

    def _linger(self) -> None:
        """Half-close, then read and drop what the client still sends for a while: closing
        with its bytes unread would make the kernel reset the connection, and a reset
        can destroy the answer before the client reads it (nginx's lingering close)."""
        assert self.transport is not None
        self.transport.write_eof()
        self._lingering = True
        self._paused.clear()
        self.deadline = self.loop.time() + LINGER_SECONDS
        self.transport.resume_reading()

    def close_if_idle(self) -> None:
        if not self._mid_request and not self._head_bytes and not self.answers:
            self._close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def expire(self, now: float) -> None:
        if self._lingering:
            if now >= self.deadline:
                self.abort()
            return
        if self._stalled and now - self._stalled > self.front.request_timeout:
            self.abort()  # its answers have not been taken: free what they hold
            return
        if self.answers or now < self.deadline:  # waiting on the pipeline is not the client
            return
        if not self._mid_request and not self._head_bytes:
            self._close()  # idle keep-alive connection
        else:
            timeout = self.front.request_timeout
            self._refuse(error(408, "request_timeout", f"request not received within {timeout:g}s"))

    def _pause(self, reason: str) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused.add(reason)

    def _resume(self, reason: str) -> None:
        if reason in self._paused:
            self._paused.discard(reason)
            if self._paused or self._done or self.transport is None:
                return
            if self._rest:  # parse what was kept, in a later turn (never inside a callback)
                self.loop.call_soon(self._continue)
            else:
                self.transport.resume_reading()

    def _continue(self) -> None:
        """Parse what a stopped burst kept; read again once it is all parsed."""
        if self._paused or self._done or not self._rest:
            return
        rest, self._rest = self._rest, b""
        self._feed(rest)
        if not self._rest and not self._paused and not self._done and self.transport is not None:
            self.transport.resume_reading()
