"""HTTP/1.1 on raw sockets, on every front end: what a hand-written protocol must get right.

keep-alive, pipelining, chunked bodies, Expect: 100-continue, head and body limits,
idle and slow-client timeouts, HTTP/1.0, HEAD. Every payload a 202 took is
counted, and the module's server must have landed exactly those when it stops.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections import Counter

import orjson
import pytest

from support import Server, landed_dir

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("front")]

MAX_BODY = 64 * 1024
KEEPALIVE = 2.0
REQUEST_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def sent(front) -> Counter[bytes]:
    """The payloads the server on `front` acknowledged: exactly these must land."""
    return Counter()


@pytest.fixture(scope="module")
def server(tmp_path_factory, front, sent):
    cwd = tmp_path_factory.mktemp(f"http-{front}")
    server = Server(
        "--max-body-bytes",
        str(MAX_BODY),
        "--keepalive-timeout",
        str(KEEPALIVE),
        "--request-timeout",
        str(REQUEST_TIMEOUT),
        cwd=cwd,
        front=front,
    )
    yield server
    assert server.stop() == 0
    # Every acknowledged payload landed, once; nothing else did.
    assert landed_dir(cwd / "fastingest-data" / "objects") == sent


def body_of(*payloads: dict) -> bytes:
    return orjson.dumps(list(payloads))


def acked(sent: Counter[bytes], *payloads: dict) -> None:
    sent.update(orjson.dumps(p) for p in payloads)


def post(body: bytes, *headers: str, version: str = "1.1") -> bytes:
    head = [
        f"POST /ingest HTTP/{version}",
        "Host: 127.0.0.1",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *headers,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def read_answer(reader) -> tuple[int, dict[str, str], bytes]:
    """One answer from a socket's file: status, headers (lower-case names), body."""
    status_line = reader.readline()
    assert status_line.startswith(b"HTTP/1."), status_line
    status = int(status_line.split()[1])
    headers = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = b""
    if status >= 200 and "content-length" in headers:
        body = reader.read(int(headers["content-length"]))
    return status, headers, body


def connect(server: Server) -> tuple[socket.socket, object]:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return sock, sock.makefile("rb")


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        while data := sock.recv(65536):
            assert not data.startswith(b"HTTP/1.1 2"), data
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_keep_alive_serves_many_requests_on_one_connection(server, sent):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.connect()
    first = conn.sock
    for i in range(20):
        p = {"keepalive": i}
        conn.request("POST", "/ingest", body_of(p), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert (resp.status, json.loads(resp.read())["accepted"]) == (202, 1)
        acked(sent, p)
    assert conn.sock is first, "the connection was not kept alive"
    conn.close()


def test_pipelined_requests_are_answered_in_order(server, sent):
    sock, reader = connect(server)
    durable, received = {"pipelined": "durable"}, {"pipelined": "received"}
    sock.sendall(
        post(body_of(durable), "X-Fastingest-Ack: durable")  # answered after an fsync
        + post(body_of(received), "X-Fastingest-Ack: received")  # could be answered at once
        + post(b'{"broken": ')
        + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    answers = [read_answer(reader) for _ in range(4)]
    assert [a[0] for a in answers] == [202, 202, 400, 200]
    assert json.loads(answers[0][2])["ack"] == "durable"
    assert json.loads(answers[1][2])["ack"] == "received"
    assert json.loads(answers[2][2])["error"] == "malformed_json"
    acked(sent, durable, received)
    sock.close()


def test_a_deep_pipeline_pauses_reading_and_answers_everything_in_order(server, sent):
    """More requests in flight than the protocol holds answers for (MAX_PIPELINED = 32)."""
    sock, reader = connect(server)
    payloads = [{"deep": i} for i in range(100)]
    acks = ("durable", "received")
    sock.sendall(
        b"".join(
            post(body_of(p), f"X-Fastingest-Ack: {acks[i % 2]}") for i, p in enumerate(payloads)
        )
    )
    for i in range(len(payloads)):
        status, _, answer = read_answer(reader)
        assert (status, json.loads(answer)["ack"]) == (202, acks[i % 2]), i
    acked(sent, *payloads)
    sock.close()


def test_chunked_body_in_pieces(server, sent):
    sock, reader = connect(server)
    payloads = [{"chunked": i, "pad": "x" * 300} for i in range(3)]
    body = body_of(*payloads)
    sock.sendall(
        b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    for start in range(0, len(body), 200):
        piece = body[start : start + 200]
        sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        time.sleep(0.01)
    sock.sendall(b"0\r\n\r\n")
    status, _, answer = read_answer(reader)
    assert (status, json.loads(answer)["accepted"]) == (202, 3)
    acked(sent, *payloads)
    sock.close()


def test_chunked_body_over_the_limit_is_refused(server, front):
    sock, reader = connect(server)
    sock.sendall(
        b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    piece = b"[" + b" " * 16382 + b"]"
    try:
        for _ in range(MAX_BODY // len(piece) + 2):
            sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed while we were still sending
    status, headers, answer = read_answer(reader)
    assert status == 413 and json.loads(answer)["error"] == "body_too_large"
    if front != "aiohttp":  # the rest of the body is not worth reading
        assert headers.get("connection") == "close"
    sock.close()


def test_expect_100_continue(server, sent):
    sock, reader = connect(server)
    p = {"expect": "continue"}
    body = body_of(p)
    head, _, _ = post(body, "Expect: 100-continue").partition(b"\r\n\r\n")
    sock.sendall(head + b"\r\n\r\n")
    assert reader.readline() == b"HTTP/1.1 100 Continue\r\n"
    assert reader.readline() == b"\r\n"
    sock.sendall(body)
    status, _, answer = read_answer(reader)
    assert (status, json.loads(answer)["accepted"]) == (202, 1)
    acked(sent, p)
    sock.close()


def test_expect_100_continue_refused_before_the_body(server, front):
    sock, reader = connect(server)
    sock.sendall(
        b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 10000000\r\nExpect: 100-continue\r\n\r\n"
    )
    status, _, answer = read_answer(reader)
    if front == "aiohttp":  # aiohttp says 100 before any handler runs
        assert status == 100
        status, _, answer = read_answer(reader)
    assert status == 413 and json.loads(answer)["error"] == "body_too_large"
    sock.close()


def test_an_oversized_head_is_refused_and_the_server_keeps_serving(server, sent, front):
    sock, reader = connect(server)
    sock.sendall(post(body_of({"never": 1}), "X-Filler: " + "y" * 70_000))
    status, _, answer = read_answer(reader)
    if front != "aiohttp":
        assert status == 431 and json.loads(answer)["error"] == "headers_too_large"
    else:  # aiohttp's parser refuses a header line over 8190 bytes with a plain-text 400
        assert status == 400
    sock.close()
    assert server.post(body_of({"after": "head"}))[0] == 202
    acked(sent, {"after": "head"})


def test_malformed_request_line(server, front):
    sock, reader = connect(server)
    sock.sendall(b"THIS IS NOT HTTP\r\n\r\n")
    status, _, answer = read_answer(reader)
    assert status == 400
    if front != "aiohttp":
        assert json.loads(answer)["error"] == "bad_request"
    sock.close()


def test_http_1_0_is_answered_then_closed(server, sent):
    sock, reader = connect(server)
    p = {"http": "1.0"}
    sock.sendall(post(body_of(p), version="1.0"))
    status, _, answer = read_answer(reader)
    assert (status, json.loads(answer)["accepted"]) == (202, 1)
    acked(sent, p)
    assert closed_by_peer(sock, within=5)


def test_head_sends_no_body(server):
    sock, reader = connect(server)
    sock.sendall(
        b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    status_line = reader.readline()
    assert b" 200 " in status_line
    while reader.readline() != b"\r\n":
        pass
    # No body after HEAD: the next bytes are the GET's answer.
    status, _, answer = read_answer(reader)
    assert (status, json.loads(answer)) == (200, {"status": "ok"})
    sock.close()


def test_an_idle_connection_is_closed_after_the_keepalive_timeout(server, sent):
    sock, reader = connect(server)
    p = {"idle": 1}
    sock.sendall(post(body_of(p)))
    assert read_answer(reader)[0] == 202
    acked(sent, p)
    assert closed_by_peer(sock, within=KEEPALIVE + 5)


def test_a_slow_client_gets_408(server, front):
    if front == "aiohttp":
        pytest.skip("aiohttp has no timeout for a request's head and body; the lean front end has")
    sock, reader = connect(server)
    sock.sendall(b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Type: appl")  # and then nothing
    started = time.monotonic()
    status, headers, answer = read_answer(reader)
    assert status == 408 and json.loads(answer)["error"] == "request_timeout"
    assert headers.get("connection") == "close"
    assert time.monotonic() - started < REQUEST_TIMEOUT + 3
    assert closed_by_peer(sock, within=5)
