"""fastingest: land a flood of JSON payloads in S3 without losing any."""

from fastingest.compat import USE_EXTENSIONS
from fastingest.errors import QueueClosed, QueueEmpty, QueueFull
from fastingest.pool import WorkerPool
from fastingest.queue import RingQueue

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
