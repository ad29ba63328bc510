"""Mutated HTTP requests against a running server: every answer well formed, no 5xx.

    python -m bench.http_fuzz --requests 200000 --seed 1 --http lean

Starts ``fastingest serve`` (one process, a local-directory sink, a bearer token) unless
--port is given, then sends --requests requests built from a few valid ones (ingest with
Content-Length, chunked, gzip, Expect, the GET/HEAD endpoints) with seeded mutations of
their heads and framing: flipped, inserted and deleted bytes, repeated fields, other
numbers for lengths and chunk sizes, cut requests. Threads send them over fresh
connections (half-closed after the request) and over reused ones (a few requests each).

Checked throughout: each answer is a well-formed HTTP/1.x response or a clean close; no
5xx except 501 (an unknown transfer coding); /healthz on another connection answers
within a second; the server's resident memory. At the end, the payloads that landed are
read back: each payload of a request answered 202 landed exactly once, and nothing
landed from a request that was refused. The suite runs 10,000 requests per front end
(tests/test_hostile.py); this script runs longer.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import random
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

TOKEN = "fuzz-token"
# aiohttp answers a request line without a version in its own "HTTP/0.9" status line
_STATUS = re.compile(rb"HTTP/(?:1\.[01]|0\.9) (\d{3}) [^\r\n]*\r\n")
_ID = re.compile(rb'"id":"(fz-\d+)"')
_HEAD = re.compile(rb"[\r\n]*HEAD ")  # empty lines before a request line are skipped
_LENGTH = re.compile(rb"\r\nContent-Length: (\d+)\r\n", re.IGNORECASE)
INTERESTING = [b"\r", b"\n", b"\r\n", b"\x00", b" ", b":", b",", b"\t", b"\x7f", b"\xff", b"0"]
NUMBERS = [b"0", b"1", b"-1", b"99999999999999999999", b"0x10", b"+5", b" 5", b"1e3", b"ffff"]


@dataclass
class Outcome:
    """What the fuzz run saw; `problems` is empty when every check held."""

    sent: int = 0
    answered: Counter[int] = field(default_factory=Counter)
    closed: int = 0  # a clean close instead of an answer
    unknown: set[bytes] = field(default_factory=set)  # ids whose answer never came
    accepted: set[bytes] = field(default_factory=set)
    refused: set[bytes] = field(default_factory=set)
    slowest_health: float = 0.0
    peak_rss: int = 0
    problems: list[str] = field(default_factory=list)


def base_requests(i: int) -> list[tuple[bytes, bytes]]:
    """(head, body) of each valid request, carrying payload id fz-<i>."""
    payload = b'{"id":"fz-%d","v":[1,2,3]}' % i
    auth = b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
    post = b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + auth
    packed = gzip.compress(payload)
    chunked = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (5, payload[:5], len(payload) - 5, payload[5:])
    return [
        (post + b"Content-Length: %d\r\n\r\n" % len(payload), payload),
        (post + b"Transfer-Encoding: chunked\r\n\r\n", chunked),
        (post + b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(packed), packed),
        (post + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(payload), payload),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b""),
        (b"HEAD /readyz HTTP/1.1\r\nHost: x\r\n\r\n", b""),
        (b"GET /metrics HTTP/1.0\r\n\r\n", b""),
    ]


def mutate(rng: random.Random, head: bytes, body: bytes) -> bytes:
    """One to three mutations of the head (and of chunk framing); the payload bytes stay."""
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(7)
        if kind == 0 and head:  # flip a byte
            at = rng.randrange(len(head))
            head = head[:at] + bytes([rng.randrange(256)]) + head[at + 1 :]
        elif kind == 1:  # insert something parsers care about
            at = rng.randrange(len(head) + 1)
            head = head[:at] + rng.choice(INTERESTING) * rng.randint(1, 3) + head[at:]
        elif kind == 2 and len(head) > 2:  # delete a run
            at = rng.randrange(len(head) - 1)
            head = head[:at] + head[at + rng.randint(1, 8) :]
        elif kind == 3:  # repeat a field line
            lines = head.split(b"\r\n")
            if len(lines) > 3:
                at = rng.randrange(1, len(lines) - 2)
                lines.insert(at, lines[at])
                head = b"\r\n".join(lines)
        elif kind == 4:  # another number for a length
            head = re.sub(rb"(?<=Content-Length: )\d+", rng.choice(NUMBERS), head, count=1)
        elif kind == 5 and b"\r\n0\r\n" in body:  # another chunk size
            body = rng.choice(NUMBERS) + body[body.index(b"\r\n") :]
        elif kind == 6:  # cut the request short
            whole = head + body
            return whole[: rng.randrange(len(whole) + 1)]
    return head + body


def read_answer(sock: socket.socket, head: bool, timeout: float) -> tuple[int | str, bool]:
    """The next final answer's status (100s skipped) and whether it closes the connection;
    or "closed" / "timeout" instead of a status. ValueError for anything malformed."""
    sock.settimeout(timeout)
    data = b""
    while True:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            if (m := _STATUS.match(data)) is None:
                raise ValueError(f"not an HTTP response: {data[:80]!r}")
            status = int(m.group(1))
            answer_head = data[: end + 4]
            if status == 100:
                data = data[end + 4 :]
                continue
            length = _LENGTH.search(answer_head)
            if length is None:
                raise ValueError(f"an answer without Content-Length: {answer_head[:200]!r}")
            if len(data) >= end + 4 + (0 if head else int(length.group(1))):
                return status, b"connection: close" in answer_head.lower()
        elif len(data) >= 7 and not data.startswith((b"HTTP/1.", b"HTTP/0.9")):
            raise ValueError(f"not an HTTP response: {data[:80]!r}")
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return "timeout", True
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            if data:
                raise ValueError(f"closed mid-answer: {data[:80]!r}")
            return "closed", True
        data += chunk


class Fuzzer:
    def __init__(self, port: int, requests: int, seed: int, threads: int = 6) -> None:
        self.port = port
        self.requests = requests
        self.seed = seed
        self.threads = threads
        self.outcome = Outcome()
        self._lock = threading.Lock()
        self._next = 0

    def _take(self, n: int) -> list[int]:
        """Ids for the next connection's requests, until --requests have been sent (a
        connection that stops early leaves the rest of its ids unsent)."""
        with self._lock:
            if self.outcome.sent >= self.requests:
                return []
            start = self._next
            self._next += n
            return list(range(start, self._next))

    def _record(self, ids: list[bytes], status: int | None) -> None:
        out = self.outcome
        with self._lock:
            if status is None:
                out.unknown.update(ids)
            elif status == 202:
                out.accepted.update(ids)
            else:
                out.refused.update(ids)
            if status is not None:
                out.answered[status] += 1
                if status >= 500 and status != 501:
                    out.problems.append(f"answered {status}")

    def _worker(self, worker: int) -> None:
        rng = random.Random(self.seed * 1000 + worker)
        while batch := self._take(rng.choice((1, 1, 4))):
            requests = []
            for i in batch:
                head, body = rng.choice(base_requests(i))
                raw = mutate(rng, head, body) if rng.random() < 0.75 else head + body
                requests.append((raw, [b"fz-%d" % i], _HEAD.match(raw) is not None))
            try:
                self._connection(requests)
            except ValueError as exc:
                with self._lock:
                    self.outcome.problems.append(str(exc))
            except OSError as exc:
                with self._lock:
                    self.outcome.problems.append(f"connection failed: {exc!r}")
                    for _, ids, _ in requests:
                        self.outcome.unknown.update(ids)

    def _connection(self, requests: list[tuple[bytes, list[bytes], bool]]) -> None:
        """Send the requests on one connection, one at a time, the last one half-closed;
        stop at the first that gets no answer or closes the connection."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            for n, (raw, ids, head) in enumerate(requests):
                last = n == len(requests) - 1 or head  # a HEAD answer's length is not read
                with self._lock:
                    self.outcome.sent += 1
                try:
                    sock.sendall(raw)
                    if last:
                        sock.shutdown(socket.SHUT_WR)
                except OSError:  # the server closed it
                    self._record(ids, None)
                    return
                status, closing = read_answer(sock, head, 5.0 if last else 0.25)
                if status == "timeout" and not last:  # it waits for more: say there is none
                    sock.shutdown(socket.SHUT_WR)
                    status, closing = read_answer(sock, head, 5.0)
                if isinstance(status, int):
                    self._record(ids, status)
                else:
                    self._record(ids, None)
                    if status == "closed":
                        with self._lock:
                            self.outcome.closed += 1
                if closing or last:
                    return

    def _watch(self, pid: int | None, stop: threading.Event) -> None:
        out = self.outcome
        while not stop.wait(0.2):
            started = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    reply = s.recv(4096)
                ok = reply.startswith(b"HTTP/1.1 200")
            except OSError:
                ok = False
            took = time.monotonic() - started
            with self._lock:
                out.slowest_health = max(out.slowest_health, took)
                if not ok:
                    out.problems.append("/healthz did not answer 200")
                if pid is not None:
                    with contextlib.suppress(OSError):
                        out.peak_rss = max(out.peak_rss, rss_bytes(pid))

    def run(self, pid: int | None = None) -> Outcome:
        stop = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(pid, stop), daemon=True)
        watcher.start()
        workers = [
            threading.Thread(target=self._worker, args=(w,), daemon=True)
            for w in range(self.threads)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        stop.set()
        watcher.join()
        return self.outcome


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmRSS")


def check_landed(outcome: Outcome, landed: Counter[bytes]) -> list[str]:
    """Each accepted id landed once; none from a refused request; nothing unknown."""
    problems = []
    ids: Counter[bytes] = Counter()
    for line in landed:
        m = _ID.search(line)
        if m is None:
            problems.append(f"landed a payload that was never sent: {line[:80]!r}")
            continue
        ids[m.group(1)] += landed[line]
    twice = [i for i, n in ids.items() if n > 1]
    lost = outcome.accepted - set(ids)
    stray = set(ids) - outcome.accepted - outcome.unknown
    if twice:
        problems.append(f"{len(twice)} payloads landed twice, e.g. {twice[:3]}")
    if lost:
        problems.append(f"{len(lost)} acknowledged payloads were lost, e.g. {sorted(lost)[:3]}")
    if stray:
        problems.append(f"{len(stray)} payloads of refused requests landed: {sorted(stray)[:3]}")
    return problems


def main(argv: list[str] | None = None) -> None:
    import json
    import os
    import subprocess
    import sys
    import tempfile

    import zstandard

    from bench import write_results

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=6)
    ap.add_argument("--http", default="lean", help="the front end: lean or aiohttp")
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default bench/results/)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fastingest-fuzz-"))
    env = {**os.environ, "FASTINGEST_HTTP": args.http, "FASTINGEST_PROCESSES": "1"}
    cmd = [sys.executable, "-m", "fastingest", "serve", "--listen", "127.0.0.1:0"]
    cmd += ["--auth-token", TOKEN, "--request-timeout", "5"]
    proc = subprocess.Popen(cmd, cwd=work, env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    port = 0
    for line in proc.stderr:
        if m := re.search(r"listening on http://127\.0\.0\.1:(\d+)/", line):
            port = int(m.group(1))
            break
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    started = time.monotonic()
    outcome = Fuzzer(port, args.requests, args.seed, args.threads).run(proc.pid)
    took = time.monotonic() - started
    proc.terminate()
    proc.wait(60)
    landed: Counter[bytes] = Counter()
    for path in sorted((work / "fastingest-data" / "objects").rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            raw = path.read_bytes()
            if raw[:2] == b"\x1f\x8b":
                raw = gzip.decompress(raw)
            elif raw[:4] == b"\x28\xb5\x2f\xfd":
                raw = zstandard.ZstdDecompressor().stream_reader(raw).read()
            landed.update(raw.splitlines())
    problems = outcome.problems + check_landed(outcome, landed)
    summary = {
        "requests": outcome.sent,
        "seconds": round(took, 1),
        "answered": dict(sorted(outcome.answered.items())),
        "clean_closes": outcome.closed,
        "accepted": len(outcome.accepted),
        "refused": len(outcome.refused),
        "unknown": len(outcome.unknown),
        "slowest_healthz_s": round(outcome.slowest_health, 3),
        "peak_rss_mib": round(outcome.peak_rss / 2**20, 1),
        "problems": problems[:20],
    }
    print(json.dumps(summary, indent=1))
    meta = {"requests": args.requests, "seed": args.seed, "http": args.http}
    print("results:", write_results("http_fuzz", args.out, meta, **summary))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
