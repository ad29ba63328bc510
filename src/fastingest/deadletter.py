"""The dead-letter directory: objects that can never be stored as they are, each with why.

``<dir>/<key>`` holds the object exactly as it would have been uploaded and
``<dir>/<key>.error.json`` says why it is here, with what a re-upload needs (its
content type and ``fastingest-*`` metadata). Both are written durably (file and
directories fsynced) before the spool lets go of the object's records.
``fastingest redrive`` uploads them under the same keys and removes each once stored.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import orjson

from fastingest import metrics
from fastingest.batching import Upload
from fastingest.sinks.local import write_atomic

log = logging.getLogger("fastingest.deadletter")

ERROR_SUFFIX = ".error.json"


class DeadLetter:
    def __init__(self, root: Path) -> None:
        self.root = root

    def store(self, upload: Upload, error: BaseException | str, attempts: int = 0) -> None:
        """Write `upload` and its error durably; OSError if that fails (nothing is freed then).

        Blocking: call it in a thread.
        """
        objects = upload.objects()
        for obj in objects:  # a Parquet batch's rejects too, each under its own key
            path = self.root / obj.key
            info = {
                "key": obj.key,
                "payloads": obj.payloads - obj.rejected,
                "error": str(error),
                "error_type": type(error).__name__ if isinstance(error, BaseException) else "",
                "attempts": attempts,
                "dead_lettered_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "content_type": obj.content_type,
                "metadata": obj.metadata(),
                **obj.metadata(),
            }
            write_atomic(path, obj.body)
            write_atomic(path.with_name(path.name + ERROR_SUFFIX), orjson.dumps(info))
            fsync_tree(path.parent, self.root)
        metrics.OBJECTS_DEAD.inc(len(objects))
        metrics.PAYLOADS_DEAD.inc(upload.payloads)
        log.error(
            "dead-lettered %s (%d payloads) after %d attempts: %s",
            upload.key,
            upload.payloads,
            attempts,
            error,
        )


def fsync_tree(directory: Path, root: Path) -> None:
    """fsync `directory` and each parent up to and including `root` (new entries in each)."""
    directory, root = directory.resolve(), root.resolve()
    while True:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if directory == root or directory.parent == directory:
            return
        directory = directory.parent


def entries(root: Path) -> list[tuple[Path, dict[str, object]]]:
    """Every dead-lettered object under `root` with its error record, oldest first."""
    found = []
    for info_path in sorted(root.rglob(f"*{ERROR_SUFFIX}")):
        body_path = info_path.with_name(info_path.name.removesuffix(ERROR_SUFFIX))
        if body_path.is_file():
            found.append((body_path, orjson.loads(info_path.read_bytes())))
    return found
