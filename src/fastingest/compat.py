"""One switch for the compiled extensions, read by the selectors of each twin pair.

``FASTINGEST_NO_EXTENSIONS=1`` selects the pure-Python twins (``_queue_py``,
``_split_py``, ``_lean.py`` as source) and leaves every Parquet batch to pyarrow's
JSON reader (``columns``); so does a build without a compiler, which leaves no
``_queue`` extension behind.
"""

from __future__ import annotations

import importlib.util
import os

USE_EXTENSIONS: bool = os.environ.get("FASTINGEST_NO_EXTENSIONS", "") in ("", "0") and (
    importlib.util.find_spec("fastingest._queue") is not None
)

__all__ = ["USE_EXTENSIONS"]
