"""One PutObject signed and sent without botocore's per-call pipeline.

botocore runs every PutObject through parameter validation, endpoint rules, a
user agent rebuilt from scratch, a dozen event hooks, the signer and a response
parser: milliseconds of event-loop CPU per PUT, in steps that every request in
flight waits out (bench/README.md, put_bench). The sink puts the same few headers
on every object, so this module does only what changes from one PUT
to the next: it signs with botocore's own S3 SigV4 signer, given the body's
SHA-256 that the encoder already computed, and sends over the client's own HTTP
session, so proxies, TLS settings, timeouts and the connection pool stay the
client's. The body goes out in slices, with a turn for the event loop between
them.

What it takes from botocore once, at start: the object URL prefix and the
signing scope, from a put_object stopped just before it would be sent (so
endpoint rules, addressing style and region are botocore's), and the
credential provider (so refreshes are botocore's). What it leaves to botocore:
every answer but success, 412 and the retryable ones (see S3Sink.put).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from aiobotocore.awsrequest import AioAWSResponse
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSPreparedRequest, AWSRequest
from botocore.utils import percent_encode

from fastingest import __version__
from fastingest.batching import Upload

log = logging.getLogger("fastingest.sinks.s3")

PROBE_KEY = "fastingest-probe"
# A slice is a short socket write: the loop gets a turn between slices rather than
# after the whole body.
SLICE_BYTES = 128 * 1024
_ERROR_CODE = re.compile(rb"<Code>([^<]{1,64})</Code>")
_AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256 Credential=[^/]+/\d{8}/(?P<region>[^/]+)/(?P<service>[^/]+)/aws4_request,"
)


class _Signer(S3SigV4Auth):
    """botocore's SigV4 for S3, given the body's SHA-256 that the encoder already
    computed: botocore would hash the body again (or, over TLS with Content-MD5, leave
    it unsigned)."""

    def __init__(self, credentials: Any, service: str, region: str, payload_sha256: str) -> None:
        super().__init__(credentials, service, region)
        self._payload_sha256 = payload_sha256

    def payload(self, request: AWSRequest) -> str:
        return self._payload_sha256


async def _slices(body: bytes) -> AsyncIterator[memoryview]:
    view = memoryview(body)
    for start in range(0, len(view), SLICE_BYTES):
        if start:
            await asyncio.sleep(0)
        yield view[start : start + SLICE_BYTES]


class DirectPut:
    """PUTs to one bucket: `prefix_url` ends where the (percent-encoded) key begins."""

    def __init__(
        self, prefix_url: str, region: str, service: str, credentials: Any, http: Any
    ) -> None:
        parts = urlsplit(prefix_url)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.prefix_path = parts.path
        self.host = parts.netloc.lower()  # as sent: the port only where the URL has one
        self.region = region
        self.service = service
        self._credentials = credentials
        self._http = http
        self._user_agent = f"fastingest/{__version__}"

    @classmethod
    async def for_client(cls, client: Any, session: Any, bucket: str) -> DirectPut | None:
        """The direct path for `bucket`, or None where botocore must do it all.

        A dry run of put_object, stopped just before it would go on the wire, shows
        the URL and the SigV4 scope botocore signs with. None when it signs some other
        way (SigV4a for multi-region access points, session tokens for S3 Express), or
        when the client has no credentials or no aiohttp session to share.
        """
        http = getattr(getattr(client, "_endpoint", None), "http_session", None)
        credentials = await session.get_credentials()
        if http is None or not hasattr(http, "send") or credentials is None:
            return None
        seen: list[AWSPreparedRequest] = []

        def dry_run(request: AWSPreparedRequest, **_: Any) -> AioAWSResponse:
            seen.append(request)
            response = AioAWSResponse(request.url, 200, {}, None)
            response._content = b""  # as botocore's Stubber does: nothing to read
            return response

        event = "before-send.s3.PutObject"
        client.meta.events.register_first(event, dry_run, unique_id="fastingest-dry-run")
        try:
            await client.put_object(Bucket=bucket, Key=PROBE_KEY, Body=b"")
        except Exception:
            log.info("s3://%s: put_object's dry run failed", bucket, exc_info=True)
            return None
        finally:
            client.meta.events.unregister(event, unique_id="fastingest-dry-run")
        if not seen:
            return None
        parts = urlsplit(seen[0].url)
        headers = {name.lower(): value for name, value in seen[0].headers.items()}
        authorization = headers.get("authorization", b"")
        if isinstance(authorization, bytes):
            authorization = authorization.decode("ascii", "replace")
        auth = _AUTHORIZATION.match(authorization)
        if (
            auth is None
            or "x-amz-s3session-token" in headers
            or parts.query
            or not parts.path.endswith("/" + PROBE_KEY)
        ):
            return None
        prefix_path = parts.path[: -len(PROBE_KEY)]
        prefix_url = urlunsplit((parts.scheme, parts.netloc, prefix_path, "", ""))
        return cls(prefix_url, auth["region"], auth["service"], credentials, http)

    def path(self, upload: Upload) -> str:
        return self.prefix_path + percent_encode(upload.key, safe="/~")

    def headers(
        self, upload: Upload, path: str, *, conditional: bool, credentials: Any
    ) -> dict[str, str]:
        """The signed headers of the PUT for `upload`: put_object's, less its SDK extras."""
        headers = {
            "Content-Length": str(len(upload.body)),
            "Content-MD5": upload.content_md5,
            "Content-Type": upload.content_type,
            **{f"x-amz-meta-{name}": value for name, value in upload.metadata().items()},
        }
        if conditional:
            headers["If-None-Match"] = "*"
        # Host is signed as it is sent: the port only where the URL has one.
        request = AWSRequest("PUT", self.origin + path, {**headers, "Host": self.host})
        _Signer(credentials, self.service, self.region, upload.sha256).add_auth(request)
        signed = dict(request.headers.items())
        signed["User-Agent"] = self._user_agent  # never signed (as in botocore)
        return signed

    async def put(self, upload: Upload, *, conditional: bool) -> tuple[int, str]:
        """Send the PUT: its status, and the S3 error code where it failed.

        Network errors raise as botocore's own (the sink classifies them).
        """
        credentials = await self._credentials.get_frozen_credentials()
        path = self.path(upload)
        headers = self.headers(upload, path, conditional=conditional, credentials=credentials)
        body = _slices(upload.body)
        request = AWSPreparedRequest("PUT", self.origin + path, headers, body, False)
        await asyncio.sleep(0)  # signing was one step; sending starts the next
        response = await self._http.send(request)
        status: int = response.status_code
        if status < 300:
            return status, ""
        match = _ERROR_CODE.search(await response.content)
        return status, match.group(1).decode("ascii", "replace") if match else ""
