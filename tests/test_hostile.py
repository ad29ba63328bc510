"""Hostile or broken clients on an exposed port, on every front end, over real sockets.

Credentials only from the header fields (never a chunked trailer), trailers bounded like
headers, Idempotency-Key bounded and authorised before a replay, request targets that are
not a path answered 4xx (test_config holds the start-up checks of token sources).
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Sequence

import pytest

from support import Server, request

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("front")]

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, front):
    server = Server("--auth-token", TOKEN, cwd=tmp_path_factory.mktemp(f"hostile-{front}"))
    yield server
    assert server.stop() == 0
    assert "Traceback" not in server.text
    assert '"level":"error"' not in server.text, server.text


def exchange(port: int, raw: bytes, *, pieces: Sequence[bytes] = (), timeout: float = 10) -> bytes:
    """Send `raw`, then each of `pieces` until the server answers; return all it sends."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        for piece in pieces:
            if select.select([s], [], [], 0.05)[0]:
                break  # it answered: stop sending, or the close would reset what it said
            s.sendall(piece)
        out = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                out += chunk
        return out


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def chunked(trailer: bytes) -> bytes:
    body = b'{"id":"trailer"}'
    return (
        b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n" % (len(body), body)
        + trailer
    )


def test_credentials_in_a_trailer_are_not_trusted(guarded):
    answer = exchange(guarded.port, chunked(b"Authorization: Bearer %s\r\n\r\n" % TOKEN.encode()))
    assert status_of(answer) == 401, answer


def test_a_trailer_counts_against_the_head_limit(guarded, front):
    if front == "aiohttp":  # its parser bounds each trailer field at 8 KiB itself (400)
        pytest.skip("aiohttp's own parser bounds trailer fields; its answer is its own")
    started = time.monotonic()
    head = chunked(b"X-Long: ")
    answer = exchange(guarded.port, head, pieces=[b"a" * 16384] * 16)  # 256 KiB of trailer
    assert status_of(answer) == 431, answer[:200]
    assert time.monotonic() - started < 5
    assert request(guarded.port, "GET", "/healthz")[0] == 200


@pytest.mark.parametrize("key", ["k" * 256, "tab\tin key", "caf\u00e9"])
def test_a_bad_idempotency_key_is_refused(guarded, key):
    raw = (
        b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + TOKEN.encode() + b"\r\nIdempotency-Key: " + key.encode("utf-8")
        + b"\r\nContent-Length: 9\r\nConnection: close\r\n\r\n{\"a\": 1}\n"
    )  # fmt: skip
    answer = exchange(guarded.port, raw)
    assert status_of(answer) == 400 and b"bad_idempotency_key" in answer, answer


def test_a_known_idempotency_key_without_credentials_is_unauthorized(guarded):
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    key = {"Idempotency-Key": "replay-me-1"}
    assert request(guarded.port, "POST", "/ingest", b'{"id":"once"}', {**auth, **key})[0] == 202
    no_auth = {"Content-Type": "application/json", **key}
    status, _, answer = request(guarded.port, "POST", "/ingest", b'{"id":"once"}', no_auth)
    assert (status, answer["error"]) == (401, "unauthorized")


@pytest.mark.parametrize(
    "line",
    [b"GET http://x HTTP/1.1", b"GET http://x:99999/ingest HTTP/1.1", b"CONNECT host:443 HTTP/1.1"],
)
def test_a_target_that_is_not_a_path_is_a_4xx(guarded, line):
    answer = exchange(guarded.port, line + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert 400 <= status_of(answer) < 500, answer


def test_bodies_in_flight_are_bounded_over_all_connections(tmp_path, front):
    """One body holds most of the budget: another that would pass it gets 503 at once (its
    bytes read and dropped, not kept), and fits again once the first is taken."""
    server = Server("--max-inflight-bytes", "1M", cwd=tmp_path)
    body = b'[{"pad":"%s"}]' % (b"p" * 700_000)
    head = (
        b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow:
        slow.sendall(head + body[:1000])  # its head is in: its whole length is reserved
        time.sleep(0.5)
        status, headers, answer = request(
            server.port, "POST", "/ingest", body, {"Content-Type": "application/json"}
        )
        assert (status, answer["error"]) == (503, "overloaded") and "retry-after" in headers
        slow.sendall(body[1000:])
        assert slow.recv(65536).startswith(b"HTTP/1.1 202")
    assert (
        request(server.port, "POST", "/ingest", body, {"Content-Type": "application/json"})[0]
        == 202
    )
    assert server.stop() == 0


def test_a_truncated_zstd_body_is_refused_whole(guarded):
    from test_bodies import _zstd_in_blocks

    lines = [b'{"n":%d}\n' % i for i in range(4096)]
    frame, first_block = _zstd_in_blocks(lines)
    headers = {
        "Authorization": f"Bearer {TOKEN}",
        "Content-Type": "application/x-ndjson",
        "Content-Encoding": "zstd",
    }
    status, _, answer = request(guarded.port, "POST", "/ingest", frame[:first_block], headers)
    assert (status, answer["error"]) == (400, "bad_encoding")
    assert request(guarded.port, "POST", "/ingest", frame, headers)[:1] == (202,)


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /healthz HTTP/1.1\r\n", 400),  # HTTP/1.1 without Host
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n", 400),
        (b"GET /healthz HTTP/1.0\r\n", 200),  # HTTP/1.0 may leave it out
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Same: 1\r\n" * 100, 431),
    ],
    ids=["no-host", "two-hosts", "http-1.0", "101-field-lines"],
)
def test_host_and_field_line_rules(guarded, front, head, status):
    answer = exchange(guarded.port, head + b"Connection: close\r\n\r\n")
    if status == 431 and front == "aiohttp":
        status = 400  # aiohttp's parser refuses too many headers itself, in its own words
    assert status_of(answer) == status, answer[:300]
