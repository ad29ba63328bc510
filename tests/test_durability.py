"""Acknowledged means stored: ack levels, crash recovery, idempotency, S3 and disk faults.

Every test counts what was acknowledged and what landed, and they must match:
each acknowledged payload exactly once, nothing that was never sent. What is kept and
replayed does not depend on the HTTP front end, so only the tests of the ack answers run
on each.
"""

from __future__ import annotations

import asyncio
import random
import resource
import signal
import time
from collections import Counter

import orjson
import pytest

from support import (
    FakeS3,
    S3Proxy,
    Server,
    crash_rounds,
    landed_dir,
    landed_s3,
    load,
    wait_until,
)

pytestmark = pytest.mark.timeout(240)


def assert_exactly_once(got: Counter[bytes], acked: list[bytes], sent: list[bytes] | None = None):
    assert all(n == 1 for n in got.values()), "a payload landed twice"
    missing = Counter(acked) - got
    assert not missing, f"{sum(missing.values())} acknowledged payloads were lost"
    if sent is not None:
        assert not got - Counter(sent), "something landed that was never sent"


def body(i: int, tag: str = "p") -> bytes:
    return orjson.dumps({"id": f"{tag}-{i}"})


def test_ack_levels_and_the_per_request_header(tmp_path, s3, bucket, s3_env, front):
    args = ["--sink", f"s3://{bucket}", "--batch-max-age", "0.2"]
    server = Server(*args, cwd=tmp_path, env=s3_env, front=front)
    status, _, answer = server.post(body(1))
    assert (status, answer["ack"]) == (202, "durable")  # the default
    status, _, answer = server.post(body(2), **{"X-Fastingest-Ack": "received"})
    assert (status, answer["ack"]) == (202, "received")
    status, _, answer = server.post(body(3), **{"X-Fastingest-Ack": "uploaded"})
    assert (status, answer) == (202, {"accepted": 1, "ack": "uploaded"})
    # "uploaded" answered only once the object holding it was in the bucket.
    got, _ = landed_s3(s3, bucket)
    assert got[body(3)] == 1
    status, _, answer = server.post(body(4), **{"X-Fastingest-Ack": "eventually"})
    assert (status, answer["error"]) == (400, "bad_ack")
    assert server.stop() == 0
    got, _ = landed_s3(s3, bucket)
    assert got == Counter([body(1), body(2), body(3)])


def test_received_survives_kill_9_once_written(tmp_path):
    """`received` asks for no fsync, yet its spool record is written at once: a kill -9
    (not a host crash) after that loses nothing."""
    server = Server("--batch-max-age", "60", cwd=tmp_path)
    for i in range(20):
        assert server.post(body(i), **{"X-Fastingest-Ack": "received"})[0] == 202
    time.sleep(0.3)  # a flush or so
    server.stop(signal.SIGKILL)
    again = Server("--batch-max-age", "0.2", cwd=tmp_path)
    assert again.stop() == 0
    assert landed_dir(tmp_path / "fastingest-data" / "objects") == Counter(
        body(i) for i in range(20)
    )


def test_idempotency_key_answers_a_retry_with_the_first_answer(tmp_path, s3, bucket, s3_env, front):
    server = Server("--sink", f"s3://{bucket}", cwd=tmp_path, env=s3_env, front=front)
    first = server.post(body(1), **{"Idempotency-Key": "req-1"})
    again = server.post(body(1), **{"Idempotency-Key": "req-1"})
    assert first[0] == again[0] == 202 and first[2] == again[2]
    assert again[1]["idempotent-replayed"] == "true" and "idempotent-replayed" not in first[1]
    # A refused request is not remembered: its retry is processed afresh.
    assert server.post(b"[1]", **{"Idempotency-Key": "req-2"})[0] == 422
    assert server.post(body(2), **{"Idempotency-Key": "req-2"})[0] == 202
    assert server.post(body(3))[0] == 202
    assert server.stop() == 0
    got, _ = landed_s3(s3, bucket)
    assert got == Counter([body(1), body(2), body(3)])


def test_restart_uploads_what_the_spool_holds(tmp_path, s3, bucket, s3_env):
    stalled = FakeS3("stall")
    dead = Server(
        "--sink",
        f"s3://{bucket}",
        "--batch-max-payloads",
        "3",
        "--compression",
        "gzip",  # the next run's default is zstd: a replayed batch keeps its first form
        cwd=tmp_path,
        env={**s3_env, "AWS_ENDPOINT_URL": stalled.url},
    )
    acked = [body(i) for i in range(10) if dead.post(body(i))[0] == 202]
    assert len(acked) == 10
    dead.stop(signal.SIGKILL)  # nothing reached S3; everything is in the spool
    stalled.close()
    assert landed_s3(s3, bucket)[0] == Counter()
    alive = Server("--sink", f"s3://{bucket}", cwd=tmp_path, env=s3_env)
    assert "replayed the spool" in alive.text
    assert alive.stop() == 0
    got, objects = landed_s3(s3, bucket)
    assert_exactly_once(got, acked)
    replayed = [o["key"] for o in objects if o["key"].endswith(".ndjson.gz")]
    assert len(replayed) == 3  # the three batches closed (and recorded) before the kill
    for key in replayed:
        stored = s3.get_object(Bucket=bucket, Key=key)
        assert stored["ContentType"] == "application/gzip"
        assert stored["Body"].read()[:2] == b"\x1f\x8b"
    spool = tmp_path / "fastingest-data" / "spool" / "0"
    assert spool.is_dir() and list(spool.glob("seg-*.log")) == []


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["batch", "per-payload"])
def test_kill_9_at_random_moments_loses_nothing_acknowledged(tmp_path, s3, bucket, s3_env, mode):
    rng = random.Random(20261128 if mode == "batch" else 7)
    args = [
        "--sink",
        f"s3://{bucket}",
        "--mode",
        mode,
        "--batch-max-payloads",
        "300",
        "--batch-max-age",
        "0.3",
    ]
    # Per-payload mode stores one object per payload (moto takes ~400/s): a lighter load.
    rounds, clients, per_request = (10, 8, 10) if mode == "batch" else (4, 4, 2)
    top = 1.5 if mode == "batch" else 0.6
    acked, sent = crash_rounds(
        args,
        cwd=tmp_path,
        env=s3_env,
        rng=rng,
        rounds=rounds,
        pause=lambda: rng.uniform(0.2, top),
        clients=clients,
        per_request=per_request,
    )
    got, objects = landed_s3(s3, bucket)
    assert_exactly_once(got, acked, sent)
    keys = [o["key"] for o in objects]
    assert len(keys) == len(set(keys))


def test_flaky_s3_loses_nothing_and_duplicates_nothing(tmp_path, store):
    """A PUT refused before the store saw it, or failed after the store kept it (the
    retry then meets its own object): on moto, and on SeaweedFS, which checks each
    signature through the proxy and honours If-None-Match itself."""
    bucket = store.bucket()
    proxy = S3Proxy(store.env["AWS_ENDPOINT_URL"], fail_before=0.2, fail_after=0.2)
    proxy.mode = "flaky"
    args = ("--sink", f"s3://{bucket}", "--batch-max-payloads", "200", "--retry-base-delay", "0.02")
    env = {**store.env, "AWS_ENDPOINT_URL": proxy.url}
    server = Server(*args, cwd=tmp_path, env=env)
    acked: list[bytes] = []
    statuses: Counter[int] = Counter()
    asyncio.run(load(server.port, tag="flaky", seconds=2, acked=acked, statuses=statuses))
    assert server.stop() == 0
    assert "dead-lettered 0" in server.text
    if "stay in the spool" in server.text:
        # Three failures in a row made the sink count as failing just as the drain ended,
        # and a stop does not wait for a failing sink: the next start delivers the rest.
        proxy.mode = "pass"
        again = Server(*args, cwd=tmp_path, env=env)
        assert again.stop() == 0
        assert "dead-lettered 0" in again.text and "stay in the spool" not in again.text
    proxy.close()
    assert proxy.counts["slowdown"] and proxy.counts["failed_after_store"], proxy.counts
    got, objects = landed_s3(store.client, bucket)
    assert_exactly_once(got, acked)
    assert sum(o["count"] for o in objects) == len(acked)  # no object holds a repeat


def test_s3_down_for_a_while(tmp_path, s3, bucket, s3_env, moto_endpoint):
    proxy = S3Proxy(moto_endpoint)
    server = Server(
        "--sink",
        f"s3://{bucket}",
        "--batch-max-payloads",
        "100",
        "--max-queue",
        "50",
        "--spool-max-bytes",
        "300K",
        "--max-workers",
        "2",
        "--retry-base-delay",
        "0.05",
        cwd=tmp_path,
        env={**s3_env, "AWS_ENDPOINT_URL": proxy.url},
    )
    acked: list[bytes] = []
    statuses: Counter[int] = Counter()
    proxy.mode = "down"
    asyncio.run(load(server.port, tag="down", seconds=2.5, acked=acked, statuses=statuses))
    assert statuses[503] > 0, statuses  # the spool or the queue filled up: 503 + Retry-After
    assert landed_s3(s3, bucket)[0] == Counter()
    proxy.mode = "pass"  # the endpoint is back: delivery resumes on its own
    assert wait_until(lambda: sum(landed_s3(s3, bucket)[0].values()) >= len(acked), timeout=60)
    asyncio.run(load(server.port, tag="after", seconds=0.5, acked=acked, statuses=statuses))
    assert server.stop() == 0
    proxy.close()
    assert_exactly_once(landed_s3(s3, bucket)[0], acked)


def _limit_file_size() -> None:
    # A file-size cap stands in for a full disk: writes past it fail with EFBIG.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_spool_disk_full_answers_503_and_loses_nothing(tmp_path, s3, bucket, s3_env):
    server = Server(
        "--sink",
        f"s3://{bucket}",
        "--batch-max-payloads",
        "50",
        cwd=tmp_path,
        env=s3_env,
        preexec_fn=_limit_file_size,
    )
    acked: list[bytes] = []
    refused = 0
    for i in range(400):
        status, _, answer = server.post(b'{"id":"full-%d","pad":"%s"}' % (i, b"x" * 400))
        if status == 202:
            acked.append(b'{"id":"full-%d","pad":"%s"}' % (i, b"x" * 400))
        else:
            assert (status, answer["error"]) == (503, "spool_unavailable"), answer
            refused += 1
    assert refused and acked
    assert server.request("GET", "/healthz")[0] == 200
    assert server.stop() == 0
    assert "SPOOL WRITE FAILED" in server.text
    got, objects = landed_s3(s3, bucket)
    assert all(n == 1 for n in got.values())
    assert not Counter(acked) - got
    # A batch that left a refused chunk out counts the payloads it holds, not those it had.
    assert all(int(o["metadata"]["fastingest-payloads"]) == o["count"] for o in objects)


def test_a_spool_left_by_more_processes_is_reported_then_replayed(tmp_path, s3, bucket, s3_env):
    from fastingest.spool import Spool
    from fastingest.spool_records import DATA

    async def leave_behind() -> None:  # what worker 1 of a crashed 2-process run left
        spool = Spool(tmp_path / "fastingest-data" / "spool" / "1", 1 << 30)
        spool.open()
        await spool.wait(spool.append(DATA, 0, 1700000000.0, body(1, "stranded") + b"\n", 1))
        import os

        os.close(spool._file)  # let go as a dying process would: no clean close, lock released
        os.close(spool._lock_fd)

    asyncio.run(leave_behind())
    single = Server("--sink", f"s3://{bucket}", cwd=tmp_path, env=s3_env)
    assert single.stop() == 0
    assert "nothing replays it until fastingest starts with --processes 2" in single.text
    assert landed_s3(s3, bucket)[0] == Counter()
    double = Server(
        "--sink", f"s3://{bucket}", cwd=tmp_path, env={**s3_env, "FASTINGEST_PROCESSES": "2"}
    )
    assert wait_until(lambda: double.text.count("listening on") == 2, timeout=30)
    assert double.stop() == 0
    assert landed_s3(s3, bucket)[0] == Counter([body(1, "stranded")])
