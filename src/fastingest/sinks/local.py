"""A directory as the sink: the same keys as S3, written atomically (write, fsync, rename)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from fastingest.batching import Upload
from fastingest.sinks import SinkError


def write_atomic(path: Path, data: bytes, *, exclusive: bool = False) -> bool:
    """Readers see the whole file or nothing: write a temporary, fsync, rename.

    `exclusive`: never replace an existing file (link instead of rename); returns
    False when `path` already existed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        with contextlib.suppress(OSError):  # a full disk must not keep the partial file
            tmp.unlink()
        raise
    if not exclusive:
        os.replace(tmp, path)
        return True
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


class LocalSink:
    prefix = ""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"LocalSink({self.root.as_uri() if self.root.is_absolute() else self.root})"

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    async def put(self, upload: Upload) -> bool:
        try:
            # Exclusive: keys are deterministic, so an existing file is this very object.
            return await asyncio.to_thread(
                write_atomic, self.root / upload.key, upload.body, exclusive=True
            )
        except OSError as exc:  # ENOSPC and friends: worth retrying, then dead-letter
            raise SinkError(
                f"{exc.strerror or exc}: {exc.filename}", retryable=True, kind="os"
            ) from exc

    async def check(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise SinkError(f"{self.root} is not writable", retryable=True, kind="os")

    async def close(self) -> None:
        pass
