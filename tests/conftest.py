"""Shared fixtures: every queue test runs against the compiled core and its twin."""

from __future__ import annotations

import importlib
import os

import pytest

from fastingest import _queue_py

try:
    from fastingest import _queue as _queue_c
except ImportError:  # pragma: no cover - only without a compiler
    _queue_c = None

IMPLS = [pytest.param(_queue_py.RingQueue, id="py")]
if _queue_c is not None:
    IMPLS.insert(0, pytest.param(_queue_c.RingQueue, id="c"))


def pytest_configure(config: pytest.Config) -> None:
    # CI must test the compiled core; a silent fallback to the twin would hide a broken build.
    if os.environ.get("FASTINGEST_REQUIRE_EXTENSIONS") == "1" and _queue_c is None:
        raise pytest.UsageError(
            "FASTINGEST_REQUIRE_EXTENSIONS=1 but fastingest._queue is not built"
        )


@pytest.fixture(params=IMPLS)
def RingQueue(request: pytest.FixtureRequest) -> type:
    return request.param


@pytest.fixture(params=IMPLS)
def impl_module(request: pytest.FixtureRequest):
    """The selector module reloaded so `fastingest.queue.RingQueue` is the chosen twin."""
    return importlib.import_module(request.param.__module__)
