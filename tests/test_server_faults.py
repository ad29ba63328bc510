"""Overload, a failing or vanished S3, SIGTERM under load: nothing acknowledged is lost."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections import Counter

import aiohttp
import orjson
import pytest

from support import FakeS3, S3Proxy, Server, dead_lettered, landed_dir, landed_s3, wait_until

pytestmark = pytest.mark.timeout(180)


def line(i: int, tag: str = "p") -> bytes:
    return orjson.dumps({"id": f"{tag}-{i}", "seq": i})


@pytest.fixture
def stalled():
    fake = FakeS3("stall")
    yield fake
    fake.close()


def test_overload_answers_503_with_retry_after_and_loses_nothing(
    tmp_path, stalled, s3, bucket, s3_env
):
    """Per-payload mode holds its objects in memory: a stalled sink fills the queue."""
    args = ["--mode", "per-payload", "--max-workers", "1", "--max-queue", "4"]
    server = Server(
        "--sink",
        f"s3://{bucket}",
        *args,
        "--shutdown-timeout",
        "3",
        cwd=tmp_path,
        env={**s3_env, "AWS_ENDPOINT_URL": stalled.url},
    )
    accepted: Counter[bytes] = Counter()
    refused = 0
    for i in range(30):
        status, headers, answer = server.post(line(i))
        if status == 202:
            accepted[line(i)] += 1
        else:
            assert status == 503, answer
            assert answer["error"] == "overloaded"
            assert int(headers["retry-after"]) >= 1
            refused += 1
    assert refused > 0 and accepted, "the queue never filled, or never took anything"
    # Held in memory at most: 4 in the intake, 1 batcher hand-off, 1 job slot, 1 in the
    # dispatcher's hand, 1 in flight to the stalled sink.
    assert 4 <= sum(accepted.values()) <= 8
    assert server.request("GET", "/healthz")[0] == 200  # still serving while full
    assert server.stop() == 0
    # The sink never answered: every acknowledged payload stays in the spool, and the
    # next start on it (the sink answering now) delivers them.
    assert not (tmp_path / "fastingest-data" / "dead-letter").exists()
    assert Server("--sink", f"s3://{bucket}", *args, cwd=tmp_path, env=s3_env).stop() == 0
    assert landed_s3(s3, bucket)[0] == accepted


@pytest.mark.parametrize("failure", ["refused", "window"])
def test_what_can_never_be_stored_goes_to_the_dead_letter_directory(
    tmp_path, s3, bucket, s3_env, moto_endpoint, failure
):
    """A refusal of the object itself, or a window that runs out: dead letters, nothing lost.
    A sink that is merely down (refused connections, 500s) is waited for: see test_outages."""
    proxy = S3Proxy(moto_endpoint)
    if failure == "refused":
        proxy.refuse = lambda headers: (400, "InvalidArgument")
        extra = []
    else:
        proxy.mode = "down"
        extra = ["--delivery-window", "1", "--retry-base-delay", "0.05"]
    server = Server(
        "--sink",
        f"s3://{bucket}/prefix",
        "--batch-max-payloads",
        "2",
        *extra,
        cwd=tmp_path,
        env={**s3_env, "AWS_ENDPOINT_URL": proxy.url},
    )
    sent: Counter[bytes] = Counter()
    for i in range(6):
        assert server.post(line(i))[0] == 202
        sent[line(i)] += 1
    root = tmp_path / "fastingest-data" / "dead-letter"
    assert wait_until(lambda: dead_lettered(root)[0] == sent, timeout=30)
    assert server.stop() == 0
    proxy.close()
    got, errors = dead_lettered(root)
    assert got == sent
    assert len(errors) == 3 and all(e["key"].startswith("prefix/dt=") for e in errors)
    if failure == "refused":
        assert all(e["attempts"] == 1 and "InvalidArgument" in e["error"] for e in errors)
        # No retry of what the store refuses for itself: one direct PUT and one through
        # botocore's put_object (which might know better) per object.
        assert proxy.counts["refused"] == 6
    else:
        assert all("delivery window of 1s passed" in e["error"] for e in errors)
    assert "dead-lettered 6" in server.text
    assert landed_s3(s3, bucket)[0] == Counter()


async def _load(
    port: int,
    stop_after: float,
    tag: str,
    acked: list[bytes],
    sent: list[bytes],
    on_half: threading.Event,
) -> None:
    """32 clients POST 10-payload collections until the server goes away (bounded: 20 s)."""
    deadline = time.monotonic() + 20
    counter = iter(range(10**9))

    async def client(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            batch = [line(next(counter), tag) for _ in range(10)]
            sent.extend(batch)
            body = b'{"version":1,"data":[' + b",".join(batch) + b"]}"
            try:
                async with session.post(
                    f"http://127.0.0.1:{port}/ingest",
                    data=body,
                    headers={"Content-Type": "application/json"},
                ) as resp:
                    await resp.read()
                    if resp.status == 202:
                        acked.extend(batch)
            except (TimeoutError, aiohttp.ClientError):
                return  # the server is gone; this request was not acknowledged
            if len(acked) > stop_after:
                on_half.set()

    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(32)))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_under_load_loses_nothing_acknowledged(tmp_path, s3, bucket, s3_env, sig):
    server = Server(
        "--sink", f"s3://{bucket}", "--batch-max-payloads", "500", cwd=tmp_path, env=s3_env
    )
    acked: list[bytes] = []
    sent: list[bytes] = []
    loaded = threading.Event()

    def stopper() -> None:
        loaded.wait(15)
        server.proc.send_signal(sig)

    threading.Thread(target=stopper, daemon=True).start()
    asyncio.run(_load(server.port, 2000, "load", acked, sent, loaded))
    assert server.stop() == 0
    assert len(acked) >= 2000, "the load never got going"
    got, _ = landed_s3(s3, bucket)
    assert not got - Counter(sent), "something landed that was never sent"
    assert all(n == 1 for n in got.values()), "a payload landed twice"
    missing = Counter(acked) - got
    assert not missing, f"{sum(missing.values())} acknowledged payloads were lost"
    assert "dead-lettered 0" in server.text


def test_signals_after_the_drain_do_not_change_a_clean_exit(tmp_path):
    """SIGTERM repeated until the process is gone: each lands somewhere in the drain or the
    exit after it, and the process must still exit 0 with what it accepted stored."""
    server = Server(cwd=tmp_path)
    assert server.post(line(1))[0] == 202
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 60
    while server.proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.002)
    assert server.stop() == 0, server.text
    assert landed_dir(tmp_path / "fastingest-data" / "objects") == Counter([line(1)])


def test_memory_stays_bounded_with_the_queue_full_and_the_sink_stalled(tmp_path, stalled, s3_env):
    """Defaults but a 160 MiB spool, sink stalled, up to ~400 MiB offered: closed batches wait
    on disk, not in memory, so peak RSS stays under the documented 256 MiB while the spool
    fills up to its bound."""
    import random

    server = Server(
        "--sink",
        "s3://stalled",
        "--shutdown-timeout",
        "2",
        "--spool-max-bytes",
        "160M",
        cwd=tmp_path,
        env={**s3_env, "AWS_ENDPOINT_URL": stalled.url},
    )
    rng = random.Random(5)
    # ~900 KiB NDJSON bodies of 450-byte payloads that compress about as well as real events.
    lines = [
        b'{"id":"%032x","v":%d,"note":"%s"}'
        % (rng.getrandbits(128), i, bytes(rng.choice(b"abcdefghij klmnop") for _ in range(380)))
        for i in range(2000)
    ]
    body = b"\n".join(lines) + b"\n"
    statuses: Counter[int] = Counter()
    for _ in range(450):
        statuses[server.post(body, "application/x-ndjson")[0]] += 1
        if statuses[503] >= 20:
            break
    assert statuses[503] >= 20, f"never filled up: {statuses}"  # full: the bound is reached
    status_file = f"/proc/{server.proc.pid}/status"
    peak_kib = next(int(line.split()[1]) for line in open(status_file) if line.startswith("VmHWM"))
    assert server.stop() == 0
    held_mib = statuses[202] * len(body) / 2**20
    assert peak_kib / 1024 <= 256, f"peak RSS {peak_kib / 1024:.0f} MiB holding {held_mib:.0f} MiB"
