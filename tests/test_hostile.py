"""Hostile or broken clients on an exposed port, on every front end, over real sockets.

Credentials only from the header fields (never a chunked trailer), trailers bounded like
headers, Idempotency-Key bounded and authorised before a replay, request targets that are
not a path answered 4xx (test_config holds the start-up checks of token sources).
"""

from __future__ import annotations

import contextlib
import re
import select
import socket
import time
from collections.abc import Sequence

import pytest

from bench import http_fuzz
from support import Server, landed_dir, request

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("front")]

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, front):
    cwd = tmp_path_factory.mktemp(f"hostile-{front}")
    server = Server("--auth-token", TOKEN, cwd=cwd, front=front)
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
    server = Server("--max-inflight-bytes", "1M", cwd=tmp_path, front=front)
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


def answers_in(raw: bytes) -> list[int]:
    """The status of each response in `raw`, interim ones (100) included."""
    return [int(m) for m in re.findall(rb"HTTP/1\.[01] (\d{3}) ", raw)]


def authorized_post(body: bytes, *extra: bytes, version: bytes = b"1.1") -> bytes:
    return (
        b"POST /ingest HTTP/" + version + b"\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + TOKEN.encode() + b"\r\n" + b"".join(extra)
        + b"Content-Length: %d\r\n\r\n" % len(body) + body
    )  # fmt: skip


def test_upgrade_is_ignored_and_the_body_read(guarded):
    """curl --http2 on a cleartext port: answered as HTTP/1.1, the connection kept."""
    upgrade = authorized_post(
        b'{"id":"h2c"}',
        b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n",
        b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n",
    )
    then = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as s:
        s.sendall(upgrade)
        answer = s.recv(65536)
        assert answers_in(answer) == [202] and b"Connection: close" not in answer, answer
        s.sendall(then)  # the same connection, as a client (or proxy) reusing it
        while chunk := s.recv(65536):
            answer += chunk
    assert answers_in(answer) == [202, 200], answer


@pytest.mark.parametrize(
    "after",
    [b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"JUNK\r\n\r\n"],
    ids=["a-request", "junk"],
)
def test_nothing_is_written_after_connection_close(guarded, front, after):
    first = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = exchange(guarded.port, first + after)
    expected = [200]
    if front == "aiohttp":  # its parser refuses the whole read before answering the first
        expected = [400]
    assert answers_in(answer) == expected, answer
    assert answer.count(b"Connection: close") <= 1


def test_connect_is_refused_and_nothing_after_it_is_parsed(guarded):
    raw = b"CONNECT host:443 HTTP/1.1\r\nHost: host:443\r\n\r\n"
    raw += b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = exchange(guarded.port, raw)
    assert answers_in(answer) == [400] and b"Connection: close" in answer, answer


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nExpect: teapot\r\n", 417),
        (b"HEAD /nowhere HTTP/1.1\r\nHost: x\r\n", 404),
        (b"HEAD /ingest HTTP/1.1\r\nHost: x\r\n", 405),
    ],
    ids=["417", "404", "405"],
)
def test_head_answers_carry_no_body(guarded, head, status):
    answer = exchange(guarded.port, head + b"Connection: close\r\n\r\n")
    assert answers_in(answer) == [status], answer
    assert answer.endswith(b"\r\n\r\n"), answer  # the head of the answer, and nothing after


@pytest.mark.parametrize(
    ("version", "coding", "status"),
    [(b"1.0", b"chunked", 400), (b"1.1", b"gzip, chunked", 501), (b"1.1", b"gzip", 400)],
    ids=["http-1.0", "gzip-then-chunked", "not-chunked-last"],
)
def test_transfer_codings_other_than_chunked(guarded, version, coding, status):
    body = b'{"id":"te"}'
    raw = (
        b"POST /ingest HTTP/" + version + b"\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + TOKEN.encode() + b"\r\nTransfer-Encoding: " + coding
        + b"\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    )  # fmt: skip
    answer = exchange(guarded.port, raw)
    assert answers_in(answer) == [status], answer


def test_a_client_that_half_closes_still_gets_its_answer(guarded):
    raw = authorized_post(b'{"id":"half"}', b"X-Fastingest-Ack: durable\r\n")
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as s:
        s.sendall(raw)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answers_in(answer) == [202], answer


def test_100_continue_waits_for_the_answers_before_it(guarded):
    """The first answer waits for an upload; the interim 100 of the second comes after it."""
    first = authorized_post(b'{"id":"first"}', b"X-Fastingest-Ack: uploaded\r\n")
    second_head = (
        b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + TOKEN.encode() + b"\r\nExpect: 100-continue\r\n"
        b"Content-Length: 12\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as s:
        s.sendall(first + second_head)
        seen = b""
        while b"100 Continue" not in seen:
            chunk = s.recv(65536)
            assert chunk, seen
            seen += chunk
        assert answers_in(seen) == [202, 100], seen
        s.sendall(b'{"id":"2nd"}')
        while chunk := s.recv(65536):
            seen += chunk
    assert answers_in(seen) == [202, 100, 202], seen


@pytest.mark.parametrize(
    ("field", "status"),
    [
        (b"Authorization: Bearer \xff\xfe\r\n", 401),
        (b"Authorization: Bearer %s\r\nAuthorization: Bearer x\r\n" % TOKEN.encode(), 400),
        (b"Authorization: Bearer x\r\nAuthorization: Bearer %s\r\n" % TOKEN.encode(), 400),
        (b"Content-Type: text/plain\r\n", 400),  # a second Content-Type
    ],
    ids=["not-utf-8", "token-first", "token-second", "two-content-types"],
)
def test_credentials_and_fields_read_alike_on_every_front(guarded, field, status):
    raw = (
        b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + field
        + b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
    )  # fmt: skip
    answer = exchange(guarded.port, raw)
    assert answers_in(answer) == [status], answer


def healthz_seconds(port: int) -> float:
    started = time.monotonic()
    assert request(port, "GET", "/healthz")[0] == 200
    return time.monotonic() - started


PIPELINED = 30_000  # GET /metrics, about 1 MB of requests sent in one go


def test_a_pipelined_flood_is_answered_in_turns(guarded):
    """30,000 pipelined scrapes: every one answered in order, and the process keeps
    answering others meanwhile (the work per read and per loop turn is bounded)."""
    one = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    flood = one * (PIPELINED - 1) + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    before = http_fuzz.rss_bytes(guarded.proc.pid)
    slowest = 0.0
    received = 0
    ends = b""
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=30) as s:
        s.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 60
        last_probe = 0.0
        while time.monotonic() < deadline:
            if sent < len(flood):
                with contextlib.suppress(BlockingIOError):
                    sent += s.send(flood[sent : sent + 262144])
            try:
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                received += (ends[-14:] + chunk).count(b"HTTP/1.1 200 OK")  # one may be split
                ends = (ends + chunk)[-200:]
            except BlockingIOError:
                select.select([s], [], [], 0.01)
            if time.monotonic() - last_probe > 0.2:
                slowest = max(slowest, healthz_seconds(guarded.port))
                last_probe = time.monotonic()
    assert received == PIPELINED and b'{"status":"ok"}' in ends
    assert slowest < 1.0, f"/healthz took {slowest:.2f}s during the flood"
    assert http_fuzz.rss_bytes(guarded.proc.pid) - before < 100 * 2**20


def test_a_client_that_never_reads_is_bounded_then_closed(tmp_path, front):
    server = Server("--request-timeout", "2", cwd=tmp_path, front=front)
    before = http_fuzz.rss_bytes(server.proc.pid)
    one = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setblocking(False)
        sent = 0
        flood = one * PIPELINED
        deadline = time.monotonic() + 5
        with contextlib.suppress(ConnectionError):  # closed already: checked below
            while sent < len(flood) and time.monotonic() < deadline:
                try:
                    sent += s.send(flood[sent : sent + 65536])
                except BlockingIOError:
                    time.sleep(0.01)
        time.sleep(1)
        held = http_fuzz.rss_bytes(server.proc.pid) - before
        assert healthz_seconds(server.port) < 1.0
        # Never read: within a few seconds of the request timeout (2 s) the server lets go
        # of the connection, whether its answers stalled (the write timeout) or a request
        # was cut short by the paused read (408). Seen from the server's side, as the
        # kernel lists its sockets: this client's data, stuck behind a shut window, would
        # hide a reset from the client itself.
        client = s.getsockname()[1]
        closed_by = time.monotonic() + 20
        while _server_holds(server.port, client) and time.monotonic() < closed_by:
            time.sleep(0.25)
        assert not _server_holds(server.port, client), "a connection not read must be closed"
    assert held < 50 * 2**20, f"{held / 2**20:.0f} MiB held for a client that does not read"
    assert server.stop() == 0


def test_answers_a_client_does_not_take_are_dropped_after_the_write_timeout(tmp_path, front):
    """Only the write timeout can end this connection: every request arrived whole (no
    408 is due) and the keep-alive timeout is a minute away. Each front drops a
    connection whose answers have waited longer than the request timeout."""
    args = ["--request-timeout", "1", "--keepalive-timeout", "60"]
    server = Server(*args, cwd=tmp_path, front=front)
    # 64 bytes a request: whole requests fill every slice the front parses at a time.
    one = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 21 + b"\r\n\r\n"
    assert len(one) == 64
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(one * 512)  # 32 KiB: one segment on loopback; megabytes of answers
        client = s.getsockname()[1]
        # Bounded well inside the keep-alive timeout: only the write timeout can end it.
        deadline = time.monotonic() + 20
        while _server_holds(server.port, client) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert not _server_holds(server.port, client), "answers never taken must be dropped"
    assert server.stop() == 0


def _server_holds(port: int, client: int) -> bool:
    """Whether a socket on `port` still has a connection to the client's port open."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, remote, state = line.split()[1:4]
                ports = (int(local.rpartition(":")[2], 16), int(remote.rpartition(":")[2], 16))
                if ports == (port, client) and state in ("01", "08"):  # established, close-wait
                    return True
    return False


# Per front: lean-py runs the lean front's own source, compiled in the lean run.
FUZZ_REQUESTS = {"lean": 10_000, "lean-py": 3_000, "aiohttp": 10_000}
FUZZ_RSS_BOUND = 300 * 2**20


def test_fuzzed_requests_get_an_answer_or_a_clean_close(tmp_path, front):
    """10,000 mutated requests (bench.http_fuzz, seeded; 3,000 on lean-py): no 5xx,
    well-formed answers, /healthz within a second, bounded memory, and exactly the
    accepted payloads land."""
    server = Server(
        "--auth-token", http_fuzz.TOKEN, "--request-timeout", "5", cwd=tmp_path, front=front
    )
    seed = {"lean": 1, "lean-py": 2, "aiohttp": 3}[front]
    requests = FUZZ_REQUESTS[front]
    outcome = http_fuzz.Fuzzer(server.port, requests, seed).run(server.proc.pid)
    assert server.stop() == 0
    landed = landed_dir(tmp_path / "fastingest-data" / "objects")
    problems = outcome.problems + http_fuzz.check_landed(outcome, landed)
    assert not problems, problems[:10]
    assert outcome.sent >= requests
    assert len(outcome.accepted) > requests // 10 and len(outcome.refused) > requests // 10
    assert outcome.slowest_health < 1.0
    assert 0 < outcome.peak_rss < FUZZ_RSS_BOUND
    assert "Traceback" not in server.text
