"""S3 (or any S3-compatible store) through one shared aiobotocore client per process.

Endpoint, region and credentials come from the standard AWS chain
(AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, AWS_REGION, keys, profiles), so MinIO
or moto need no special flag. botocore's own retries are off: the pipeline
retries with its own backoff, and this module only classifies errors.

PUTs take the direct path of s3_put.py (signed there, sent over the client's HTTP
session); botocore's put_object handles what that path cannot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from fastingest.batching import Upload
from fastingest.sinks import SinkError
from fastingest.sinks.s3_put import DirectPut

log = logging.getLogger("fastingest.sinks.s3")

THROTTLE_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests"}
)
# Refusals an operator fixes (credentials, a policy, the bucket itself) or that pass on
# their own (a clock, an expired token): the data waits in the spool meanwhile.
FIXABLE_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "TokenRefreshRequired",
        "InvalidToken",
        "RequestTimeTooSkewed",
        "RequestTimeout",
        "NoSuchBucket",
        "AccountProblem",
        "InvalidBucketState",
    }
)
READY_CACHE_SECONDS = 5.0
# botocore builds, signs and sends a PUT in one go: milliseconds of event-loop CPU without
# a pause, which every request in flight would wait out. Where the sink still goes
# through put_object, a yield at each of these hooks cuts it into shorter steps.
YIELD_BEFORE = ("before-parameter-build", "before-call", "request-created", "before-send")


def classify(exc: BaseException) -> SinkError:
    """The one place that decides which store errors are worth a retry."""
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return classify_status(status, code, str(exc))
    if isinstance(exc, (BotoCoreError, aiohttp.ClientError, asyncio.TimeoutError, OSError)):
        return SinkError(f"network: {type(exc).__name__}: {exc}", retryable=True, kind="network")
    return SinkError(f"{type(exc).__name__}: {exc}", retryable=False, kind="other")


def classify_status(status: int, code: str, detail: str = "") -> SinkError:
    """An error answer from the store, by HTTP status and S3 error code."""
    if code in THROTTLE_CODES or status in (429, 503):
        return SinkError(f"throttled: {code or status}", retryable=True, kind="throttled")
    if status >= 500 or status == 408:
        return SinkError(f"server error {status} {code}", retryable=True, kind="5xx")
    if status in (401, 403) or code in FIXABLE_CODES:
        return SinkError(f"refused {status} {code}: {detail}", retryable=True, kind="denied")
    if status == 404:  # the bucket (a missing key cannot be the answer to a PUT)
        return SinkError(f"not found {status} {code}: {detail}", retryable=True, kind="denied")
    return SinkError(f"refused {status} {code}: {detail}", retryable=False, kind="4xx")


async def _let_others_run(**_: Any) -> None:
    await asyncio.sleep(0)  # returns None: botocore reads that as "carry on"


class S3Sink:
    def __init__(
        self, bucket: str, prefix: str = "", *, max_connections: int = 16, direct: bool = True
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self._config = AioConfig(
            retries={"total_max_attempts": 1},
            connect_timeout=5,
            read_timeout=30,
            max_pool_connections=max_connections,
            # Each PUT carries our Content-MD5, and the signature covers that header, so the
            # body needs no second pass on the event loop: botocore would otherwise add a
            # SHA-256 of it to the signature on plain-HTTP endpoints and a CRC32 everywhere,
            # about doubling the event-loop CPU of a large PUT.
            s3={"payload_signing_enabled": False},
            request_checksum_calculation="when_required",
        )
        self._stack = AsyncExitStack()
        self._client: Any = None
        self._use_direct = direct  # False: every PUT through put_object (tests cover both)
        self._direct: DirectPut | None = None
        self._ready_until = 0.0
        self.conditional = True  # If-None-Match: * on every PUT, while the store allows it
        self.already_stored = 0

    def __repr__(self) -> str:
        return f"S3Sink(s3://{self.bucket}/{self.prefix})"

    async def start(self) -> None:
        session = get_session()
        self._client = await self._stack.enter_async_context(
            session.create_client("s3", config=self._config)
        )
        for event in YIELD_BEFORE:
            self._client.meta.events.register(f"{event}.s3.PutObject", _let_others_run)
        if self._use_direct:
            self._direct = await DirectPut.for_client(self._client, session, self.bucket)
            if self._direct is None:
                log.info("s3://%s: every PUT goes through botocore's put_object", self.bucket)

    @property
    def direct(self) -> bool:
        """Whether PUTs take the direct path (see s3_put.py) rather than put_object."""
        return self._direct is not None

    async def put(self, upload: Upload) -> bool:
        """Store `upload` once: True, or False if an object was already under its key.

        Keys are deterministic (see KeyMaker), so an existing key means an earlier
        attempt or a crashed run already stored these very payloads.
        """
        if self._direct is None:
            return await self._put_object(upload)
        try:
            status, code = await self._direct.put(upload, conditional=self.conditional)
        except Exception as exc:
            raise classify(exc) from exc
        if status < 300:
            return True
        if status == 412:
            self.already_stored += 1
            return False
        unconditional = status == 501 and self.conditional
        error = classify_status(status, code, "direct PUT")
        if error.retryable and status != 403 and not unconditional:
            raise error
        # A redirect, a refusal, or a store without conditional writes: botocore may know
        # better (a region to follow, an error to parse, its own signature), so it gets
        # this object.
        stored = await self._put_object(upload)
        if not unconditional and self._direct is not None:
            log.warning(
                "s3://%s refused a direct PUT (%d %s) that put_object then stored: "
                "every PUT goes through put_object from now on",
                self.bucket,
                status,
                code,
            )
            self._direct = None
        return stored

    async def _put_object(self, upload: Upload) -> bool:
        extra = {"IfNoneMatch": "*"} if self.conditional else {}
        try:
            await self._client.put_object(
                Bucket=self.bucket,
                Key=upload.key,
                Body=upload.body,
                ContentMD5=upload.content_md5,
                ContentType=upload.content_type,
                Metadata=upload.metadata(),
                **extra,
            )
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status == 412:
                self.already_stored += 1
                return False
            if status == 501 and self.conditional:
                log.warning(
                    "s3://%s does not support conditional writes; re-uploads after a "
                    "crash may overwrite objects with the same content",
                    self.bucket,
                )
                self.conditional = False
                return await self.put(upload)
            raise classify(exc) from exc
        except Exception as exc:
            raise classify(exc) from exc
        return True

    async def check(self) -> None:
        if time.monotonic() < self._ready_until:
            return
        try:
            await self._client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise classify(exc) from exc
        self._ready_until = time.monotonic() + READY_CACHE_SECONDS

    async def close(self) -> None:
        await self._stack.aclose()
