"""The dead-letter directory: objects that could not be stored, each with its error.

``<dir>/<key>`` holds the object exactly as it would have been uploaded and
``<dir>/<key>.error.json`` says why it is here. Re-uploading is a copy of the
tree to the sink (``aws s3 cp --recursive <dir> s3://bucket/`` for S3).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import orjson

from fastingest import metrics
from fastingest.batching import Upload
from fastingest.sinks.local import write_atomic

log = logging.getLogger("fastingest.deadletter")


class DeadLetter:
    def __init__(self, root: Path) -> None:
        self.root = root

    def store(self, upload: Upload, error: BaseException | str, attempts: int = 0) -> None:
        """Write `upload` and its error; must not raise, since it is the last resort."""
        path = self.root / upload.key
        info = {
            "key": upload.key,
            "payloads": upload.payloads,
            "error": str(error),
            "error_type": type(error).__name__ if isinstance(error, BaseException) else "",
            "attempts": attempts,
            "dead_lettered_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **upload.metadata(),
        }
        try:
            write_atomic(path, upload.body)
            write_atomic(path.with_name(path.name + ".error.json"), orjson.dumps(info))
        except OSError:
            log.critical(
                "could not dead-letter %s: its %d payloads are LOST",
                upload.key,
                upload.payloads,
                exc_info=True,
            )
            return
        metrics.OBJECTS_DEAD.inc()
        metrics.PAYLOADS_DEAD.inc(upload.payloads)
        log.error(
            "dead-lettered %s (%d payloads) after %d attempts: %s",
            upload.key,
            upload.payloads,
            attempts,
            error,
        )
