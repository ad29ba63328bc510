"""fastingest: land a flood of JSON payloads in S3 without losing any."""

from fastingest.errors import QueueClosed, QueueEmpty, QueueFull
from fastingest.pool import WorkerPool
from fastingest.queue import USE_EXTENSIONS, RingQueue

__version__ = "0.1.0"

__all__ = [
    "USE_EXTENSIONS",
    "QueueClosed",
    "QueueEmpty",
    "QueueFull",
    "RingQueue",
    "WorkerPool",
    "__version__",
]
