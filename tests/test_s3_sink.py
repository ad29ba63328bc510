"""The S3 sink on its own, against moto over HTTP (through a header-recording proxy)."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
import zstandard

from fastingest.batching import Batch, KeyMaker
from fastingest.sinks.s3 import YIELD_BEFORE, S3Sink
from support import S3Proxy

pytestmark = pytest.mark.timeout(60)


def test_a_put_carries_content_md5_and_no_second_pass_over_the_body(
    s3, bucket, s3_env, moto_endpoint, monkeypatch
):
    """Content-MD5 (signed) guards the body; no SHA-256 payload signature, no CRC32 on top."""
    proxy = S3Proxy(moto_endpoint)
    for name, value in {**s3_env, "AWS_ENDPOINT_URL": proxy.url}.items():
        monkeypatch.setenv(name, value)  # the sink finds its endpoint the standard way
    batch = Batch(1700000000.0, 0, 1 << 20, 1000, "zstd")
    for i in range(50):
        batch.add(b'{"i":%d}\n' % i, 1, 1700000000.0 + i)
    upload = batch.close(KeyMaker("", "ab12", 1, host="h"))

    async def put() -> None:
        sink = S3Sink(bucket)
        await sink.start()
        try:
            await sink.put(upload)
        finally:
            await sink.close()

    try:
        asyncio.run(put())
    finally:
        proxy.close()
    (headers,) = proxy.put_headers
    assert headers["content-md5"] == upload.content_md5
    assert "content-md5" in headers["authorization"]  # among the signed headers
    assert headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
    assert not [name for name in headers if name.startswith("x-amz-checksum")]
    stored = s3.get_object(Bucket=bucket, Key=upload.key)
    body = stored["Body"].read()
    raw = zstandard.ZstdDecompressor().stream_reader(body).read()
    assert raw == b"".join(b'{"i":%d}\n' % i for i in range(50))
    assert stored["Metadata"]["fastingest-sha256"] == hashlib.sha256(body).hexdigest()


def test_a_put_lets_the_event_loop_run_while_botocore_builds_it(s3, bucket, s3_env, monkeypatch):
    """Building and signing a PUT is ~3 ms of CPU: the loop must get turns in between."""
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    batch = Batch(1700000000.0, 0, 1 << 20, 1000, "zstd")
    batch.add(b'{"i":1}\n', 1, 1700000000.0)
    upload = batch.close(KeyMaker("", "ab12", 1, host="h"))
    turns_before_send: list[int] = []

    async def put() -> None:
        sink = S3Sink(bucket)
        await sink.start()
        turns = 0
        stop = False

        async def count_turns() -> None:
            nonlocal turns
            while not stop:
                turns += 1
                await asyncio.sleep(0)

        def at_send(**_: object) -> None:  # just before the request goes on the wire
            turns_before_send.append(turns)

        sink._client.meta.events.register("before-send.s3.PutObject", at_send)
        counter = asyncio.ensure_future(count_turns())
        try:
            await sink.put(upload)
            turns = 0
            await sink.put(upload)  # the second time, with credentials and endpoint cached
        finally:
            stop = True
            await counter
            await sink.close()

    asyncio.run(put())
    assert turns_before_send[1] >= len(YIELD_BEFORE)
    assert s3.get_object(Bucket=bucket, Key=upload.key)["Body"].read() == upload.body
