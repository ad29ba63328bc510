"""The S3 sink on its own, against real S3 APIs over HTTP: moto (often through a
fault-injecting proxy) and SeaweedFS (which checks signatures, Content-MD5 and
If-None-Match itself; the `store` fixture runs a test on both).

PUTs take the direct path (s3_put.py) unless it is turned off; most tests run
on both paths, since put_object is what the direct path falls back to.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import boto3
import pytest
import zstandard
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials

from fastingest.batching import Batch, KeyMaker, Upload
from fastingest.sinks import SinkError, s3_put
from fastingest.sinks.s3 import YIELD_BEFORE, S3Sink
from support import S3Proxy

pytestmark = pytest.mark.timeout(60)

PATHS = [pytest.param(True, id="direct"), pytest.param(False, id="put_object")]


def small_upload(n: int = 50, prefix: str = "") -> Upload:
    batch = Batch(1700000000.0, 0, 1 << 20, 1000, "zstd")
    for i in range(n):
        batch.add(b'{"i":%d}\n' % i, 1, 1700000000.0 + i)
    return batch.close(KeyMaker(prefix, "ab12", 1, host="h"))


def big_upload(key: str, size: int = 1 << 20) -> Upload:
    line = b'{"pad":"%s"}\n' % (b"x" * 1000)
    parts = [line * (size // len(line))]
    upload = Upload(key, parts, size, 1, 1.7e9, 1.7e9, "application/x-ndjson")
    upload.seal()
    return upload


async def put_and_tell_path(sink: S3Sink, upload: Upload) -> bool:
    """Put, then whether the sink still takes the direct path (a fallback would turn it off)."""
    await sink.put(upload)
    return sink.direct


def with_sink(bucket: str, direct: bool, use: Callable[[S3Sink], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        sink = S3Sink(bucket, direct=direct)
        await sink.start()
        try:
            return await use(sink)
        finally:
            await sink.close()

    return asyncio.run(run())


class LoopTurns:
    """Counts the event loop's turns while in use, from a task that counts and yields."""

    def __init__(self) -> None:
        self.count = 0
        self._stop = False
        self._task: asyncio.Future[None] | None = None

    async def _run(self) -> None:
        while not self._stop:
            self.count += 1
            await asyncio.sleep(0)

    async def __aenter__(self) -> LoopTurns:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, *_: object) -> None:
        self._stop = True
        assert self._task is not None
        await self._task


@pytest.fixture
def at_store(store, monkeypatch):
    """The sink finds the store the standard way (AWS_ENDPOINT_URL and the key variables)."""
    for name, value in store.env.items():
        monkeypatch.setenv(name, value)
    return store


@pytest.fixture
def at_moto(s3_env, monkeypatch) -> None:
    """The sink finds moto the standard way (AWS_ENDPOINT_URL and the key variables)."""
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def proxy(moto_endpoint, s3_env, monkeypatch):
    """S3Proxy in front of moto, found by the sink the standard way (AWS_ENDPOINT_URL)."""
    proxy = S3Proxy(moto_endpoint)
    for name, value in {**s3_env, "AWS_ENDPOINT_URL": proxy.url}.items():
        monkeypatch.setenv(name, value)
    yield proxy
    proxy.close()


@pytest.mark.parametrize("direct", PATHS)
def test_a_put_carries_content_md5_and_no_second_pass_over_the_body(s3, bucket, proxy, direct):
    """Content-MD5 (signed) guards the body; the payload hash is one already computed.

    The direct path signs the SHA-256 the encoder computed; put_object signs
    UNSIGNED-PAYLOAD (so botocore does not hash the body again). Neither adds a CRC32.
    """
    upload = small_upload()
    assert with_sink(bucket, direct, lambda sink: sink.put(upload)) is True
    (headers,) = proxy.put_headers
    assert headers["content-md5"] == upload.content_md5
    assert "content-md5" in headers["authorization"]  # among the signed headers
    expected = upload.sha256 if direct else "UNSIGNED-PAYLOAD"
    assert headers["x-amz-content-sha256"] == expected
    assert headers["user-agent"].startswith("fastingest/" if direct else "aiobotocore/")
    assert not [name for name in headers if name.startswith("x-amz-checksum")]
    stored = s3.get_object(Bucket=bucket, Key=upload.key)
    body = stored["Body"].read()
    raw = zstandard.ZstdDecompressor().stream_reader(body).read()
    assert raw == b"".join(b'{"i":%d}\n' % i for i in range(50))
    assert stored["Metadata"]["fastingest-sha256"] == hashlib.sha256(body).hexdigest()
    assert stored["Metadata"]["fastingest-payloads"] == "50"
    assert stored["ContentType"] == upload.content_type


def test_the_direct_path_is_taken_against_a_real_s3_api(at_store):
    bucket = at_store.bucket()
    assert with_sink(bucket, True, lambda sink: asyncio.sleep(0, sink.direct)) is True
    assert with_sink(bucket, False, lambda sink: asyncio.sleep(0, sink.direct)) is False


@pytest.mark.parametrize("token", [None, "session-token"])
def test_the_direct_signature_is_the_one_botocore_computes_over_the_body(monkeypatch, token):
    """The direct path signs the SHA-256 the encoder computed, and the Host it sends:
    the signature botocore's own signer gets by hashing the body itself."""
    now = datetime.datetime(2026, 11, 29, 15, 4, 5)
    monkeypatch.setattr("botocore.auth.get_current_datetime", lambda: now)
    secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"  # AWS's documentation example
    credentials = ReadOnlyCredentials("AKIDEXAMPLE", secret, token)
    upload = small_upload(prefix="in put/été~")  # percent-encoded in the path
    direct = s3_put.DirectPut("http://127.0.0.1:9000/bucket/", "eu-west-1", "s3", None, None)
    path = direct.path(upload)
    assert path.startswith("/bucket/in%20put/%C3%A9t%C3%A9~")
    ours = direct.headers(upload, path, conditional=True, credentials=credentials)
    added = {"Authorization", "X-Amz-Date", "X-Amz-Content-SHA256", "X-Amz-Security-Token"}
    sent = {k: v for k, v in ours.items() if k not in added and k != "User-Agent"}
    assert sent["Host"] == "127.0.0.1:9000" and sent["If-None-Match"] == "*"
    # Over plain HTTP botocore signs the body's SHA-256, which it computes itself.
    theirs = AWSRequest("PUT", "http://127.0.0.1:9000" + path, data=upload.body, headers=sent)
    S3SigV4Auth(credentials, "s3", "eu-west-1").add_auth(theirs)
    assert ours["Authorization"] == theirs.headers["Authorization"]
    assert ours["X-Amz-Date"] == theirs.headers["X-Amz-Date"]
    assert ours["X-Amz-Content-SHA256"] == theirs.headers["X-Amz-Content-SHA256"]
    assert ours["X-Amz-Content-SHA256"] == hashlib.sha256(upload.body).hexdigest()
    assert ours.get("X-Amz-Security-Token") == token


def test_a_store_that_checks_signatures_takes_direct_puts_and_refuses_bad_ones(
    bucket, moto_endpoint, monkeypatch
):
    """moto with authentication on recomputes each signature from what it received.

    It takes the payload hash from X-Amz-Content-SHA256 without hashing the body;
    the first test here checks that header against the body.
    """
    iam = boto3.client(
        "iam",
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    user = f"writer-{bucket}"
    iam.create_user(UserName=user)
    iam.put_user_policy(
        UserName=user,
        PolicyName="s3",
        PolicyDocument='{"Version":"2012-10-17","Statement":[{"Effect":"Allow",'
        '"Action":"s3:*","Resource":"*"}]}',
    )
    key = iam.create_access_key(UserName=user)["AccessKey"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    upload = small_upload(7, prefix="signed/")
    verifying = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        aws_access_key_id=key["AccessKeyId"],
        aws_secret_access_key=key["SecretAccessKey"],
    )

    def reset_auth(count: str) -> None:
        import urllib.request

        url = f"{moto_endpoint}/moto-api/reset-auth"  # text/plain: a form body would read as ""
        request = urllib.request.Request(url, count.encode(), {"Content-Type": "text/plain"})
        urllib.request.urlopen(request).read()

    reset_auth("0")  # from now on every request must be signed by a known key
    try:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        assert with_sink(bucket, True, lambda sink: put_and_tell_path(sink, upload)) is True
        assert verifying.get_object(Bucket=bucket, Key=upload.key)["Body"].read() == upload.body

        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        with pytest.raises(SinkError) as refused:
            with_sink(bucket, True, lambda sink: sink.put(small_upload(8, prefix="signed/")))
        # A secret an operator can fix: the data waits in the spool, retried.
        assert refused.value.kind == "denied" and refused.value.retryable
        assert "SignatureDoesNotMatch" in str(refused.value)
    finally:
        reset_auth("inf")


@pytest.mark.parametrize("direct", PATHS)
def test_a_key_that_needs_encoding_lands_under_that_key(at_store, direct):
    bucket = at_store.bucket()
    upload = small_upload(3, prefix="in put/été+~=&/")
    assert with_sink(bucket, direct, lambda sink: put_and_tell_path(sink, upload)) is direct
    assert at_store.client.get_object(Bucket=bucket, Key=upload.key)["Body"].read() == upload.body


@pytest.mark.parametrize("direct", PATHS)
def test_the_store_refuses_a_second_put_of_a_key(at_store, direct):
    """If-None-Match: * as the store itself answers it (412): counted as stored, kept once."""
    bucket = at_store.bucket()
    upload = small_upload(4)

    async def twice(sink: S3Sink) -> tuple[bool, bool, int]:
        return await sink.put(upload), await sink.put(upload), sink.already_stored

    assert with_sink(bucket, direct, twice) == (True, False, 1)
    listed = at_store.client.list_objects_v2(Bucket=bucket)["Contents"]
    assert [o["Key"] for o in listed] == [upload.key]


@pytest.mark.parametrize("direct", PATHS)
def test_an_object_already_under_its_key_counts_as_stored(s3, bucket, proxy, direct):
    upload = small_upload()

    async def twice(sink: S3Sink) -> tuple[bool, bool, int]:
        return await sink.put(upload), await sink.put(upload), sink.already_stored

    assert with_sink(bucket, direct, twice) == (True, False, 1)
    assert [h.get("if-none-match") for h in proxy.put_headers] == ["*", "*"]
    assert s3.get_object(Bucket=bucket, Key=upload.key)["Body"].read() == upload.body


@pytest.mark.parametrize("direct", PATHS)
def test_a_store_without_conditional_writes_gets_plain_puts(s3, bucket, proxy, direct, caplog):
    """501 to If-None-Match: warn once, drop the header, store; the path stays as it was."""
    proxy.refuse = lambda headers: (501, "NotImplemented") if "if-none-match" in headers else None
    first, second = small_upload(5), small_upload(6)

    async def two(sink: S3Sink) -> tuple[bool, bool]:
        await sink.put(first)
        await sink.put(second)
        return sink.conditional, sink.direct

    with caplog.at_level(logging.WARNING, logger="fastingest.sinks.s3"):
        assert with_sink(bucket, direct, two) == (False, direct)
    assert "does not support conditional writes" in caplog.text
    assert proxy.counts["refused"] == 1 + direct  # the direct PUT, then put_object's
    assert "if-none-match" not in proxy.put_headers[-1]
    for upload in (first, second):
        assert s3.get_object(Bucket=bucket, Key=upload.key)["Body"].read() == upload.body


def test_a_refused_direct_put_goes_to_put_object_and_later_puts_stay_there(
    s3, bucket, proxy, caplog
):
    """A store that refuses what only the direct path sends: put_object stores it."""

    def refuse_direct(headers: dict[str, str]) -> tuple[int, str] | None:
        return (400, "InvalidRequest") if headers["user-agent"].startswith("fastingest/") else None

    proxy.refuse = refuse_direct
    first, second = small_upload(5), small_upload(6)

    async def two(sink: S3Sink) -> bool:
        await sink.put(first)
        await sink.put(second)
        return sink.direct

    with caplog.at_level(logging.WARNING, logger="fastingest.sinks.s3"):
        assert with_sink(bucket, True, two) is False
    assert "refused a direct PUT (400 InvalidRequest)" in caplog.text
    assert proxy.counts["refused"] == 1
    assert len(proxy.put_headers) == 3  # direct (refused), put_object, put_object
    for upload in (first, second):
        assert s3.get_object(Bucket=bucket, Key=upload.key)["Body"].read() == upload.body


@pytest.mark.parametrize("direct", PATHS)
def test_throttling_is_a_retryable_error_and_is_not_sent_twice(bucket, proxy, direct):
    proxy.refuse = lambda headers: (503, "SlowDown")
    with pytest.raises(SinkError) as throttled:
        with_sink(bucket, direct, lambda sink: sink.put(small_upload()))
    assert throttled.value.retryable and throttled.value.kind == "throttled"
    assert len(proxy.put_headers) == 1  # the pipeline retries, with its backoff


@pytest.mark.parametrize("direct", PATHS)
def test_a_missing_bucket_is_retryable_and_keeps_the_path(at_moto, direct):
    """An operator creates the bucket: until then the data waits, it is not dead-lettered.
    (moto only: SeaweedFS creates a missing bucket on upload for an admin identity.)"""

    async def put(sink: S3Sink) -> None:
        try:
            await sink.put(small_upload())
        finally:
            assert sink.direct is direct  # not the direct path's fault: it stays

    with pytest.raises(SinkError) as refused:
        with_sink("no-such-bucket-here", direct, put)
    assert refused.value.retryable and refused.value.kind == "denied"
    assert "NoSuchBucket" in str(refused.value)


@pytest.mark.parametrize("direct", PATHS)
def test_a_refusal_of_the_object_itself_is_final(bucket, proxy, direct):
    proxy.refuse = lambda headers: (400, "EntityTooLarge")
    with pytest.raises(SinkError) as refused:
        with_sink(bucket, direct, lambda sink: sink.put(small_upload()))
    assert not refused.value.retryable and refused.value.kind == "4xx"
    assert "EntityTooLarge" in str(refused.value)


def test_the_direct_path_sends_the_body_in_slices_with_turns_between(at_store, monkeypatch):
    """aiohttp takes the body a slice at a time, and the loop runs between slices."""
    s3, bucket = at_store.client, at_store.bucket()
    upload = big_upload("big/one.ndjson")
    turns = LoopTurns()
    turns_at_slice: list[int] = []
    slices = s3_put._slices

    async def watched(body: bytes) -> AsyncIterator[memoryview]:
        async for piece in slices(body):
            turns_at_slice.append(turns.count)
            yield piece

    monkeypatch.setattr(s3_put, "_slices", watched)

    async def put(sink: S3Sink) -> None:
        async with turns:
            await sink.put(upload)

    with_sink(bucket, True, put)
    assert len(turns_at_slice) == -(-len(upload.body) // s3_put.SLICE_BYTES) > 4
    assert all(a < b for a, b in itertools.pairwise(turns_at_slice))
    assert s3.get_object(Bucket=bucket, Key=upload.key)["Body"].read() == upload.body


def test_a_put_lets_the_event_loop_run_while_botocore_builds_it(at_store):
    """put_object builds and signs a PUT in ~3 ms of CPU: the loop must get turns in between."""
    s3, bucket = at_store.client, at_store.bucket()
    upload = small_upload(1)
    turns_before_send: list[int] = []

    turns = LoopTurns()

    def at_send(**_: object) -> None:  # just before the request goes on the wire
        turns_before_send.append(turns.count)

    async def put(sink: S3Sink) -> None:
        sink._client.meta.events.register("before-send.s3.PutObject", at_send)
        async with turns:
            await sink.put(upload)
            turns.count = 0
            await sink.put(upload)  # the second time, with credentials and endpoint cached

    with_sink(bucket, False, put)
    assert turns_before_send[1] >= len(YIELD_BEFORE)
    assert s3.get_object(Bucket=bucket, Key=upload.key)["Body"].read() == upload.body


def test_a_client_whose_dry_run_fails_starts_on_put_object(at_moto):
    """botocore refuses this bucket name before anything is sent: no direct path, no crash."""
    assert with_sink("not/a/bucket", True, lambda sink: asyncio.sleep(0, sink.direct)) is False
