"""Whole-server runs against each real S3 store: moto, and SeaweedFS, which checks every
signature, Content-MD5 and If-None-Match itself.

What differs between the two stores is said here, not in the product: moto takes any
signature unless its authentication is switched on, SeaweedFS refuses a bad one with
403 SignatureDoesNotMatch.
"""

from __future__ import annotations

import signal
import uuid
from collections import Counter

import pytest

from support import Server, landed_s3, wait_until
from test_durability import assert_exactly_once, body

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("mode", ["batch", "per-payload"])
def test_ingest_lands_once_on_each_store(tmp_path, store, mode):
    bucket = store.bucket()
    server = Server(
        "--sink", f"s3://{bucket}/in", "--mode", mode, "--batch-max-payloads", "7",
        cwd=tmp_path, env=store.env,
    )  # fmt: skip
    acked = [body(i, mode) for i in range(30) if server.post(body(i, mode))[0] == 202]
    assert len(acked) == 30
    assert server.stop() == 0
    got, objects = landed_s3(store.client, bucket)
    assert_exactly_once(got, acked, acked)
    assert all(o["key"].startswith("in/") for o in objects)
    if mode == "batch":
        assert all(o["metadata"]["fastingest-payloads"] == str(o["count"]) for o in objects)


def test_a_crash_is_replayed_once_on_each_store(tmp_path, store):
    """kill -9 with every batch still in the spool; the next start stores each once."""
    bucket = store.bucket()
    args = ("--sink", f"s3://{bucket}", "--batch-max-payloads", "4")
    dead = Server(*args, "--batch-max-age", "60", cwd=tmp_path, env=store.env)
    acked = [body(i, "crash") for i in range(10) if dead.post(body(i, "crash"))[0] == 202]
    assert len(acked) == 10
    dead.stop(signal.SIGKILL)
    alive = Server(*args, cwd=tmp_path, env=store.env)
    assert "replayed the spool" in alive.text
    assert alive.stop() == 0
    got, _ = landed_s3(store.client, bucket)
    assert_exactly_once(got, acked, acked)


def test_a_wrong_secret_is_refused_and_the_data_waits(tmp_path, seaweedfs):
    """SeaweedFS checks the signature: with a wrong secret nothing lands, /readyz stays 200
    (the spool is the buffer), and the same spool stores everything with the right one."""
    client = seaweedfs.client()
    bucket = f"fi-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    wrong = Server(
        "--sink", f"s3://{bucket}", "--batch-max-payloads", "2", "--retry-max-delay", "0.5",
        cwd=tmp_path, env=seaweedfs.env(secret="not-the-secret"),
    )  # fmt: skip
    acked = [body(i, "secret") for i in range(6) if wrong.post(body(i, "secret"))[0] == 202]
    assert len(acked) == 6
    assert wait_until(lambda: "SignatureDoesNotMatch" in wrong.text, timeout=30), wrong.text
    assert wrong.request("GET", "/readyz")[0] == 200
    assert wrong.stop() == 0
    assert landed_s3(client, bucket)[0] == Counter()
    right = Server("--sink", f"s3://{bucket}", cwd=tmp_path, env=seaweedfs.env())
    assert wait_until(lambda: sum(landed_s3(client, bucket)[0].values()) >= 6, timeout=30)
    assert right.stop() == 0
    got, _ = landed_s3(client, bucket)
    assert_exactly_once(got, acked, acked)
