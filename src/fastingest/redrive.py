"""``fastingest redrive``: dead letters back into the sink, under the same keys.

Each object goes up with its recorded content type and ``fastingest-*`` metadata,
through the sink's conditional write (an object already under its key counts as
stored), and its two files are removed only once it is stored. What the store
refuses again stays where it is, with the new error in the log.
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from fastingest.batching import CONTENT_TYPES, EXTENSIONS, Upload
from fastingest.deadletter import ERROR_SUFFIX, entries
from fastingest.sinks import Sink, SinkError

log = logging.getLogger("fastingest.redrive")


def _epoch(iso: str) -> float:
    """fastingest-first/-last back to epoch seconds (they keep milliseconds)."""
    whole, _, frac = iso.rstrip("Z").partition(".")
    seconds = calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S"))
    return seconds + (int(frac) + 0.5) / 1000 if frac else float(seconds)


def upload_of(body: bytes, info: dict[str, Any]) -> Upload:
    """The Upload a dead letter came from: same key, body, content type and metadata."""
    key = str(info["key"])
    meta = info.get("metadata") or {k: v for k, v in info.items() if k.startswith("fastingest-")}
    compression = next((c for c, ext in EXTENSIONS.items() if key.endswith(ext)), "none")
    default_type = CONTENT_TYPES[compression] if key.endswith(tuple(EXTENSIONS.values())) else ""
    return Upload(
        key=key,
        parts=[],
        raw_size=len(body),
        payloads=int(info["payloads"]),
        first=_epoch(meta["fastingest-first"]),
        last=_epoch(meta["fastingest-last"]),
        content_type=str(info.get("content_type") or default_type or "application/json"),
        compression=compression,
        body=body,
        sha256=hashlib.sha256(body).hexdigest(),
        content_md5=base64.b64encode(hashlib.md5(body).digest()).decode(),
    )


async def redrive(root: Path, sink: Sink) -> tuple[int, int]:
    """Upload every dead letter under `root`; returns (stored, left)."""
    stored = left = 0
    for body_path, info in entries(root):
        upload = upload_of(body_path.read_bytes(), info)
        try:
            fresh = await sink.put(upload)
        except SinkError as exc:
            log.error("%s: not stored (%s); it stays in %s", upload.key, exc, root)
            left += 1
            continue
        body_path.unlink()
        body_path.with_name(body_path.name + ERROR_SUFFIX).unlink()
        stored += 1
        log.info(
            "%s: %s (%d payloads)",
            upload.key,
            "stored" if fresh else "already in the sink",
            upload.payloads,
        )
    return stored, left
