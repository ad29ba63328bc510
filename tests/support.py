"""Test helpers: run the real server as a subprocess, talk HTTP to it, count what landed."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zstandard

LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)/ingest")
# Every server started, so that one a failing test never stopped is killed after it
# (conftest's no_server_left_running): left running, it would take CPU from the rest.
STARTED: list[Server] = []
# How each front end runs: "lean-py" is the lean front end as Python source, no extensions.
FRONT_ENV = {
    "lean": {"FASTINGEST_HTTP": "lean"},
    "lean-py": {"FASTINGEST_HTTP": "lean", "FASTINGEST_NO_EXTENSIONS": "1"},
    "aiohttp": {"FASTINGEST_HTTP": "aiohttp"},
}


class Server:
    """``python -m fastingest serve`` in a subprocess, its log kept in memory."""

    def __init__(
        self,
        *args: str,
        cwd: Path,
        env: dict[str, str] | None = None,
        front: str = "lean",
        preexec_fn: Any = None,
    ) -> None:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("FASTINGEST_", "MAX_"))}
        clean["FASTINGEST_PROCESSES"] = "1"  # one process unless a test asks for more
        clean.update(FRONT_ENV[front])
        clean.update(env or {})
        cmd = [sys.executable, "-m", "fastingest", "serve", "--listen", "127.0.0.1:0", *args]
        self.proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=clean,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=preexec_fn,
        )
        STARTED.append(self)
        self.log: list[str] = []
        self.port = 0
        ready = threading.Event()

        def pump() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append(line)
                if not self.port and (m := LISTENING.search(line)):
                    self.port = int(m.group(1))
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(30) or not self.port:
            self.proc.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.log))

    @property
    def text(self) -> str:
        return "".join(self.log)

    def request(self, method: str, path: str, body: bytes | None = None, **headers: str):
        return request(self.port, method, path, body, headers)

    def post(self, body: bytes, content_type: str = "application/json", **headers: str):
        return self.request("POST", "/ingest", body, **{"Content-Type": content_type, **headers})

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("server did not stop in time:\n" + self.text) from None


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """One request on a fresh connection; returns (status, headers, parsed JSON body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
        hdrs = {k.lower(): v for k, v in resp.getheaders()}
        parsed = (
            json.loads(raw) if hdrs.get("content-type", "").startswith("application/json") else raw
        )
        return resp.status, hdrs, parsed
    finally:
        conn.close()


def unpack(body: bytes) -> bytes:
    if body[:2] == b"\x1f\x8b":
        return gzip.decompress(body)
    if body[:4] == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(body).read()
    return body


def lines_of(body: bytes, key: str) -> list[bytes]:
    raw = unpack(body)
    if key.endswith(".json"):
        return [raw]
    assert raw.endswith(b"\n"), f"{key}: NDJSON must end with a newline"
    lines = raw.split(b"\n")[:-1]
    for line in lines:
        assert isinstance(json.loads(line), dict), f"{key}: a line is not a JSON object"
    return lines


def landed_s3(s3: Any, bucket: str) -> tuple[Counter[bytes], list[dict[str, Any]]]:
    """Every payload in the bucket (as bytes, counted), and each object's metadata and hash."""
    payloads: Counter[bytes] = Counter()
    objects = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for entry in page.get("Contents", []):
            obj = s3.get_object(Bucket=bucket, Key=entry["Key"])
            body = obj["Body"].read()
            lines = lines_of(body, entry["Key"])
            payloads.update(lines)
            objects.append(
                {
                    "key": entry["Key"],
                    "metadata": obj["Metadata"],
                    "count": len(lines),
                    "sha256": hashlib.sha256(body).hexdigest(),
                }
            )
    return payloads, objects


def landed_dir(root: Path) -> Counter[bytes]:
    payloads: Counter[bytes] = Counter()
    for path in sorted(root.rglob("*")):
        if (
            path.is_file()
            and not path.name.endswith(".error.json")
            and not path.name.startswith(".")
        ):
            payloads.update(lines_of(path.read_bytes(), path.name))
    return payloads


def wait_until(predicate: Any, timeout: float = 10, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class FakeS3:
    """A misbehaving S3 endpoint on 127.0.0.1: 'stall' (accept, never answer) or 'fail' (500)."""

    def __init__(self, behaviour: str) -> None:
        import socket

        self.behaviour = behaviour
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests = 0
        self._held: list[Any] = []
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            if self.behaviour == "stall":
                self._held.append(conn)  # keep it open, say nothing
            else:
                threading.Thread(target=self._fail, args=(conn,), daemon=True).start()

    def _fail(self, conn: Any) -> None:
        # Answer as soon as the headers are in, as S3 may (clients send Expect: 100-continue
        # and wait before the body), then close.
        body = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
        with conn:
            conn.settimeout(5)
            buf = b""
            try:
                while b"\r\n\r\n" not in buf:
                    part = conn.recv(65536)
                    if not part:
                        return
                    buf += part
                self.requests += 1
                conn.sendall(
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\n"
                    b"Connection: close\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        for conn in self._held:
            conn.close()


def dead_lettered(root: Path) -> tuple[Counter[bytes], list[dict[str, Any]]]:
    """Payloads in a dead-letter directory, and the error records beside them."""
    errors = [json.loads(p.read_text()) for p in root.rglob("*.error.json")]
    return landed_dir(root), errors


class S3Proxy:
    """An HTTP proxy in front of an S3 store (moto or SeaweedFS) that injects failures,
    for fault tests. Requests go through unchanged, Host included, so signatures hold.

    mode "pass": forward everything. "flaky": answer a share of requests 503
    SlowDown without forwarding, and another share 500 *after* the store kept the
    object (the client then retries something that already exists). "down":
    drop every connection, as a stopped endpoint does. "blackhole": take the
    request and never answer (until the mode changes). "5xx": answer every
    request 500 InternalError. "delay": forward each request `delay` seconds
    late. `refuse`, where set, sees each PUT's headers and may answer (status,
    S3 error code) instead of the store.
    """

    def __init__(self, upstream: str, fail_before: float = 0.0, fail_after: float = 0.0) -> None:
        import http.server
        import random
        from urllib.parse import urlsplit

        self.mode = "pass"
        self.delay = 2.0
        self.fail_before, self.fail_after = fail_before, fail_after
        self.counts: Counter[str] = Counter()
        self.put_headers: list[dict[str, str]] = []  # of every PUT, lower-case names
        self.refuse: Callable[[dict[str, str]], tuple[int, str] | None] | None = None
        up = urlsplit(upstream)
        proxy = self
        rng = random.Random(1234)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive and Expect: 100-continue

            def log_message(self, *args: Any) -> None:
                pass

            def handle_one_request(self) -> None:
                if proxy.mode == "down":
                    proxy.counts["dropped"] += 1
                    self.close_connection = True
                    return
                if proxy.mode == "blackhole":
                    proxy.counts["held"] += 1
                    while proxy.mode == "blackhole":
                        time.sleep(0.05)
                    self.close_connection = True
                    return
                super().handle_one_request()

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if self.command == "PUT":
                    put_headers = {k.lower(): v for k, v in self.headers.items()}
                    proxy.put_headers.append(put_headers)
                    refusal = proxy.refuse(put_headers) if proxy.refuse else None
                    if refusal is not None:
                        proxy.counts["refused"] += 1
                        return self._error(*refusal)
                if proxy.mode == "5xx":
                    proxy.counts["5xx"] += 1
                    return self._error(500, "InternalError")
                if proxy.mode == "delay":
                    proxy.counts["delayed"] += 1
                    time.sleep(proxy.delay)
                roll = rng.random()
                if proxy.mode == "flaky" and self.command == "PUT" and roll < proxy.fail_before:
                    proxy.counts["slowdown"] += 1
                    return self._error(503, "SlowDown")
                assert up.hostname is not None
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                flaky_after = proxy.fail_before <= roll < proxy.fail_before + proxy.fail_after
                if proxy.mode == "flaky" and self.command == "PUT" and flaky_after:
                    proxy.counts["failed_after_store"] += 1
                    return self._error(500, "InternalError")
                proxy.counts["forwarded"] += 1
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _error(self, status: int, code: str) -> None:
                body = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.mode = "pass"  # lets a black-holed request's thread go
        self.server.shutdown()
        self.server.server_close()


async def load(
    port: int,
    *,
    tag: str,
    seconds: float,
    acked: list[bytes],
    statuses: Counter[int],
    sent: list[bytes] | None = None,
    clients: int = 16,
    per_request: int = 10,
    headers: dict[str, str] | None = None,
    fields: Callable[[int], bytes] | None = None,
) -> None:
    """POST collections from `clients` connections for `seconds` (or until the server is gone).

    Payloads are {"id": "<tag>-<n>"} (and what `fields(n)` adds, from its comma on); those
    answered 202 go to `acked`.
    """
    import asyncio

    import aiohttp

    deadline = time.monotonic() + seconds
    counter = iter(range(10**9))
    url = f"http://127.0.0.1:{port}/ingest"
    hdrs = {"Content-Type": "application/json", **(headers or {})}

    async def client(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            numbers = [next(counter) for _ in range(per_request)]
            more = fields or (lambda n: b"")
            batch = [b'{"id":"%s-%d"%s}' % (tag.encode(), n, more(n)) for n in numbers]
            if sent is not None:
                sent.extend(batch)
            body = b'{"version":1,"data":[' + b",".join(batch) + b"]}"
            try:
                async with session.post(url, data=body, headers=hdrs) as resp:
                    await resp.read()
                    statuses[resp.status] += 1
                    if resp.status == 202:
                        acked.extend(batch)
                    elif resp.status == 503:
                        await asyncio.sleep(float(resp.headers.get("Retry-After", "1")) / 10)
            except (TimeoutError, aiohttp.ClientError):
                return  # the server went away: this request was not acknowledged

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))


def post_forms(server: Server, payloads: list[dict[str, Any]], per_request: int = 30) -> int:
    """POST `payloads` as collections, arrays and NDJSON in turn; the count acknowledged."""
    acked = 0
    for start in range(0, len(payloads), per_request):
        group = payloads[start : start + per_request]
        form = (start // per_request) % 3
        if form == 0:
            body, kind = json.dumps({"version": "1", "data": group}).encode(), "application/json"
        elif form == 1:
            body, kind = json.dumps(group, ensure_ascii=False).encode(), "application/json"
        else:
            body = "".join(json.dumps(p) + "\n" for p in group).encode()
            kind = "application/x-ndjson"
        status, _, answer = server.post(body, kind)
        assert status == 202, answer
        acked += answer["accepted"]
    return acked


async def kill_during_load(server: Server, pause: float, load_args: dict[str, Any]) -> None:
    """Run load() against `server` and kill -9 it `pause` seconds in."""
    import asyncio

    task = asyncio.ensure_future(load(server.port, **load_args))
    await asyncio.sleep(pause)
    server.proc.kill()
    await task


def crash_rounds(
    args: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    rng: Any,
    rounds: int,
    pause: Callable[[], float],
    **load_args: Any,
) -> tuple[list[bytes], list[bytes]]:
    """Start the server with `args` and kill -9 it under load(), `pause()` seconds in,
    `rounds` times (each round's clients ask for ack durable or uploaded at random); then
    start it once more and stop it gracefully. (acknowledged, sent) payloads, after
    checking that the crashes left the spool something to replay and the load got going."""
    import asyncio

    acked: list[bytes] = []
    sent: list[bytes] = []
    statuses: Counter[int] = Counter()
    replayed = 0
    for round_ in range(rounds):
        server = Server(*args, cwd=cwd, env=env)
        ack = rng.choice(["durable", "uploaded"])
        this_round = dict(
            tag=f"r{round_}",
            seconds=10,
            acked=acked,
            sent=sent,
            statuses=statuses,
            headers={"X-Fastingest-Ack": ack},
            **load_args,
        )
        asyncio.run(kill_during_load(server, pause(), this_round))
        server.proc.wait(10)
        replayed += "replayed the spool" in server.text
    final = Server(*args, cwd=cwd, env=env)
    assert final.stop() == 0
    replayed += "replayed the spool" in final.text
    assert replayed >= 2, "the crashes never left anything in the spool to recover"
    assert len(acked) > 100, f"the load never got going: {statuses}"
    return acked, sent


def rich_payload(i: int) -> dict[str, Any]:
    """A payload with what analysts' readers must keep: unicode, 64-bit integers, floats,
    booleans, a null, an array and nested objects."""
    return {
        "id": i,
        "name": f"zoë-日本-😀-{i}",
        "big": 2**63 - 1 - i,
        "neg": -(2**63) + i,
        "ratio": i / 8,
        "ok": i % 2 == 0,
        "missing": None,
        "tags": ["a", f"t{i % 3}"],
        "user": {"id": f"u{i}", "geo": {"lat": 48.5 + i / 1000, "lon": -2.25}},
    }


def pyarrow_s3(s3_env: dict[str, str]) -> Any:
    """pyarrow's own S3 client, on the S3 server of `s3_env` (plain HTTP)."""
    import pyarrow.fs

    return pyarrow.fs.S3FileSystem(
        access_key=s3_env["AWS_ACCESS_KEY_ID"],
        secret_key=s3_env["AWS_SECRET_ACCESS_KEY"],
        region=s3_env["AWS_REGION"],
        endpoint_override=s3_env["AWS_ENDPOINT_URL"],
        scheme="http",
    )
