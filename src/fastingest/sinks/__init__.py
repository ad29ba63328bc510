"""Where objects land. ``open_sink(url)`` picks the implementation from the URL scheme."""

from __future__ import annotations

from typing import Protocol
from urllib.parse import unquote, urlsplit

from fastingest.batching import Upload


class SinkError(Exception):
    """A store failed. `retryable`: the data waits in the spool for another attempt
    (network, throttling, 5xx, credentials or a bucket an operator can fix); otherwise the
    store refused this object for itself and it is dead-lettered."""

    def __init__(self, message: str, *, retryable: bool, kind: str) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.kind = kind  # error class for logs and metrics: "throttled", "5xx", "network", ...


class Sink(Protocol):
    prefix: str  # prepended to every key by the KeyMaker

    async def start(self) -> None: ...
    async def put(self, upload: Upload) -> bool:
        """Store `upload`: True, or False if the sink already held its key (same payloads)."""

    async def check(self) -> None:
        """Raise SinkError unless the sink looks reachable and writable."""

    async def close(self) -> None: ...


def open_sink(url: str, *, max_connections: int = 16) -> Sink:
    parts = urlsplit(url)
    if parts.scheme == "file":
        from fastingest.sinks.local import LocalSink

        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file sink must be a local path (file:///dir), got {url!r}")
        return LocalSink(unquote(parts.path))
    if parts.scheme == "s3":
        from fastingest.sinks.s3 import S3Sink

        if not parts.netloc:
            raise ValueError(f"s3 sink needs a bucket (s3://bucket/prefix), got {url!r}")
        prefix = parts.path.strip("/")
        return S3Sink(parts.netloc, prefix + "/" if prefix else "", max_connections=max_connections)
    raise ValueError(f"unsupported sink {url!r}: use file:///dir or s3://bucket/prefix")
