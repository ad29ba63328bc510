"""Settings for ``fastingest serve``: every option, its default, and its environment twin.

Each option is defined once, as a ``Settings`` field: its default, flag,
environment names, help and parser. ``OPTIONS``, read off those fields, drives the
argument parser, the ``--help`` text and the environment lookup, so a flag and its
variable can never drift apart. Command line beats environment beats default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# Set by the supervisor in each child: which of the --processes this one is.
WORKER_INDEX_ENV = "FASTINGEST_WORKER_INDEX"
HTTP_FRONTS = ("lean", "aiohttp")
ACK_LEVELS = ("received", "durable", "uploaded")


def usable_cpus() -> int:
    """CPUs this process may run on: taskset and container cpusets count, not the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _size(text: str) -> int:
    """An integer byte count, with an optional K/M/G suffix (powers of 1024)."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def _duration(text: str) -> float:
    """Seconds, with an optional s/m/h/d suffix."""
    text = text.strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600, "d": 86400}.get(text[-1:], 0)
    return float(text[:-1] if scale else text) * (scale or 1)


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    if int(port) > 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {port} in {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _fields(text: str) -> tuple[str, ...]:
    from fastingest.partitions import parse_fields

    try:
        return parse_fields(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _time_field(text: str) -> str:
    fields = _fields(text)
    if len(fields) != 1:
        raise argparse.ArgumentTypeError(f"expected one field path, got {text!r}")
    return fields[0]


@dataclass(frozen=True)
class Option:
    """How a setting is given: its flag, its environment names, its help and parser."""

    flag: str
    env: tuple[str, ...]  # first is the documented twin; later ones are aliases
    help: str
    type: Callable[[str], Any] = str
    choices: Sequence[str] | None = None
    repeat: bool = False

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def option(
    default: Any,
    flag: str,
    env: tuple[str, ...],
    help: str,
    type: Callable[[str], Any] = str,
    choices: Sequence[str] | None = None,
    repeat: bool = False,
) -> Any:
    """A Settings field that is also an option: its default and how it is given, in one place."""
    spec = Option(flag, env, help, type, choices, repeat)
    return field(default=default, metadata={"option": spec})


@dataclass(frozen=True)
class Settings:
    """Resolved settings: each field with its default, its flag and its environment twin
    (command line beats environment beats default)."""

    listen: tuple[str, int] = option(
        _listen("127.0.0.1:8000"),
        "--listen",
        ("FASTINGEST_LISTEN", "LISTEN"),
        "address to serve on, HOST:PORT",
        _listen,
    )
    processes: int | None = option(
        None,
        "--processes",
        ("FASTINGEST_PROCESSES",),
        "server processes sharing the port (SO_REUSEPORT), each with its own queue and spool "
        "(default: the number of CPUs this process may use)",
        _positive(int),
    )
    http: str = option(
        "lean",
        "--http",
        ("FASTINGEST_HTTP",),
        "HTTP front end: lean (HTTP/1.1 on the llhttp parser, fastest) or aiohttp; "
        "both answer the same",
        str,
        HTTP_FRONTS,
    )
    # nginx's and aiohttp's
    keepalive_timeout: float = option(
        75.0,
        "--keepalive-timeout",
        ("FASTINGEST_KEEPALIVE_TIMEOUT",),
        "seconds an idle keep-alive connection stays open",
        _positive(float),
    )
    request_timeout: float = option(
        30.0,
        "--request-timeout",
        ("FASTINGEST_REQUEST_TIMEOUT",),
        "seconds a request's head and body may take to arrive before 408 (lean front end)",
        _positive(float),
    )
    sink: str | None = option(
        None,
        "--sink",
        ("FASTINGEST_SINK",),
        "where objects land: file:///dir or s3://bucket/prefix "
        "(default: file://<data-dir>/objects)",
    )
    ack: str = option(
        "durable",
        "--ack",
        ("FASTINGEST_ACK",),
        "when to answer: payloads in memory (received), fsynced to the spool (durable), "
        "or stored in the sink (uploaded); a request may ask with X-Fastingest-Ack",
        str,
        ACK_LEVELS,
    )
    spool_dir: Path | None = option(
        None,
        "--spool-dir",
        ("FASTINGEST_SPOOL_DIR",),
        "the on-disk spool (default: <data-dir>/spool), one subdirectory per process",
        Path,
    )
    spool_max_bytes: int = option(
        1024 * 1024 * 1024,
        "--spool-max-bytes",
        ("FASTINGEST_SPOOL_MAX_BYTES",),
        "spool size before answering 503 (K/M/G suffixes)",
        _positive(_size),
    )
    idempotency_window: float = option(
        600.0,
        "--idempotency-window",
        ("FASTINGEST_IDEMPOTENCY_WINDOW",),
        "seconds a request's Idempotency-Key is remembered",
        _positive(float),
    )
    # relative to the working directory
    data_dir: Path = option(
        Path("fastingest-data"),
        "--data-dir",
        ("FASTINGEST_DATA_DIR",),
        "local state: default sink, spool and dead-letter directory",
        Path,
    )
    dead_letter_dir: Path | None = option(
        None,
        "--dead-letter-dir",
        ("FASTINGEST_DEAD_LETTER_DIR",),
        "objects that could not be uploaded (default: <data-dir>/dead-letter)",
        Path,
    )
    mode: str = option(
        "batch",
        "--mode",
        ("FASTINGEST_MODE",),
        "one object per batch or per payload",
        str,
        ("batch", "per-payload"),
    )
    max_workers: int = option(
        16,
        "--max-workers",
        ("FASTINGEST_MAX_WORKERS", "MAX_WORKERS"),
        "concurrent uploads",
        _positive(int),
    )
    # queued requests (each holds one request's payloads)
    max_queue: int = option(
        10_000,
        "--max-queue",
        ("FASTINGEST_MAX_QUEUE", "MAX_QUEUE"),
        "requests held in memory before answering 503",
        _positive(int),
    )
    max_queue_bytes: int = option(
        32 * 1024 * 1024,
        "--max-queue-bytes",
        ("FASTINGEST_MAX_QUEUE_BYTES",),
        "payload bytes held in memory before answering 503 (K/M/G suffixes)",
        _positive(_size),
    )
    batch_max_bytes: int = option(
        4 * 1024 * 1024,
        "--batch-max-bytes",
        ("FASTINGEST_BATCH_MAX_BYTES",),
        "close a batch at this many uncompressed bytes",
        _positive(_size),
    )
    batch_max_payloads: int = option(
        50_000,
        "--batch-max-payloads",
        ("FASTINGEST_BATCH_MAX_PAYLOADS",),
        "close a batch at this many payloads",
        _positive(int),
    )
    batch_max_age: float = option(
        5.0,
        "--batch-max-age",
        ("FASTINGEST_BATCH_MAX_AGE",),
        "close a batch this many seconds after its first payload",
        _positive(float),
    )
    format: str = option(
        "ndjson",
        "--format",
        ("FASTINGEST_FORMAT",),
        "batch objects as compressed NDJSON, or as Parquet (needs the parquet extra)",
        str,
        ("ndjson", "parquet"),
    )
    compression: str = option(
        "zstd",
        "--compression",
        ("FASTINGEST_COMPRESSION",),
        "compression of NDJSON objects, or of Parquet pages (snappy: Parquet only)",
        str,
        ("zstd", "gzip", "snappy", "none"),
    )
    schema: Path | None = option(
        None,
        "--schema",
        ("FASTINGEST_SCHEMA",),
        "Parquet columns and types, a JSON field list (default: inferred per batch); "
        "payloads that do not fit land under format-conversion-failed/",
        Path,
    )
    partition_by: tuple[str, ...] = option(
        (),
        "--partition-by",
        ("FASTINGEST_PARTITION_BY",),
        "payload fields (dotted paths, comma-separated) whose values become field=value/ "
        "key segments before dt=/hour=",
        _fields,
    )
    time_field: str | None = option(
        None,
        "--time-field",
        ("FASTINGEST_TIME_FIELD",),
        "payload field with the event time (epoch s or ms, RFC 3339) for dt=/hour=, "
        "instead of the arrival time",
        _time_field,
    )
    max_open_partitions: int = option(
        64,
        "--max-open-partitions",
        ("FASTINGEST_MAX_OPEN_PARTITIONS",),
        "partitions with an open batch; past it the least recently written one closes",
        _positive(int),
    )
    duplicate_keys: str = option(
        "refuse",
        "--duplicate-keys",
        ("FASTINGEST_DUPLICATE_KEYS",),
        "a payload object that repeats a member name: refuse (400) or allow (stored as "
        "sent); a collection's own names never repeat",
        str,
        ("refuse", "allow"),
    )
    max_body_bytes: int = option(
        1024 * 1024,
        "--max-body-bytes",
        ("FASTINGEST_MAX_BODY_BYTES",),
        "largest request body, also after decompression; larger gets 413",
        _positive(_size),
    )
    # Request bodies being received, over all connections of a process: with the intake's
    # 32 MiB and the batches, inside the 256 MiB a process is promised to stay under.
    max_inflight_bytes: int = option(
        64 * 1024 * 1024,
        "--max-inflight-bytes",
        ("FASTINGEST_MAX_INFLIGHT_BYTES",),
        "request body bytes being received at once, over all connections; a request that "
        "would pass it gets 503 (K/M/G suffixes)",
        _positive(_size),
    )
    auth_token: tuple[str, ...] = option(
        (),
        "--auth-token",
        ("FASTINGEST_AUTH_TOKENS",),
        "accepted bearer token; repeat for several (env: comma-separated)",
        repeat=True,
    )
    auth_token_file: Path | None = option(
        None,
        "--auth-token-file",
        ("FASTINGEST_AUTH_TOKEN_FILE",),
        "file with one accepted token per line",
        Path,
    )
    shutdown_timeout: float = option(
        30.0,
        "--shutdown-timeout",
        ("FASTINGEST_SHUTDOWN_TIMEOUT",),
        "seconds to drain and upload on SIGTERM before dead-lettering the rest",
        _positive(float),
    )
    drain_delay: float = option(
        0.0,
        "--drain-delay",
        ("FASTINGEST_DRAIN_DELAY",),
        "seconds to keep serving after SIGTERM with /readyz failing, so a load balancer "
        "can stop sending traffic first (0 with a Kubernetes preStop hook)",
        float,
    )
    # As long as Kinesis Data Firehose retries: an outage over a night is delivered once the
    # store is back, with no one redriving; the spool's size, not this, usually runs out first.
    delivery_window: float = option(
        24 * 3600.0,
        "--delivery-window",
        ("FASTINGEST_DELIVERY_WINDOW",),
        "how long an object is retried while the sink fails (from its first payload's "
        "arrival; s/m/h/d suffixes) before it goes to the dead-letter directory",
        _positive(_duration),
    )
    retry_base_delay: float = option(
        0.2,
        "--retry-base-delay",
        ("FASTINGEST_RETRY_BASE_DELAY",),
        "first retry waits up to this many seconds; doubles per attempt (full jitter)",
        _positive(float),
    )
    retry_max_delay: float = option(
        30.0,
        "--retry-max-delay",
        ("FASTINGEST_RETRY_MAX_DELAY",),
        "longest wait between two tries of a failing sink, in seconds",
        _positive(float),
    )
    log_format: str = option(
        "auto",
        "--log-format",
        ("FASTINGEST_LOG_FORMAT",),
        "one line per event: json, text, or auto (text on a terminal, json otherwise)",
        str,
        ("auto", "json", "text"),
    )
    log_level: str = option(
        "INFO",
        "--log-level",
        ("FASTINGEST_LOG_LEVEL",),
        "logging level",
        str.upper,
        ("DEBUG", "INFO", "WARNING", "ERROR"),
    )
    worker_index: int | None = None  # set by the supervisor in each of its children

    @property
    def sink_url(self) -> str:
        return self.sink or (self.data_dir / "objects").resolve().as_uri()

    @property
    def process_count(self) -> int:
        return self.processes or usable_cpus()

    @property
    def spool_root(self) -> Path:
        return self.spool_dir or self.data_dir / "spool"

    @property
    def spool_path(self) -> Path:
        """This process's spool: <spool-dir>/<worker index>, 0 for a single process."""
        return self.spool_root / str(self.worker_index or 0)

    @property
    def dead_letter_path(self) -> Path:
        return self.dead_letter_dir or self.data_dir / "dead-letter"

    def check(self) -> None:
        """ValueError when options do not go together (checked before serving)."""
        if self.format == "parquet":
            from fastingest.parquet import load_schema, require_pyarrow

            require_pyarrow()
            if self.mode != "batch":
                raise ValueError("--format parquet needs --mode batch")
            if self.schema is not None:
                load_schema(self.schema)
        else:
            if self.compression == "snappy":
                raise ValueError("--compression snappy is for --format parquet")
            if self.schema is not None:
                raise ValueError("--schema is for --format parquet")
        if (self.partition_by or self.time_field) and self.mode != "batch":
            raise ValueError("--partition-by and --time-field need --mode batch")

    def tokens(self) -> list[str]:
        """Every accepted token, from flags, environment and the token file.

        A token source that is given but yields nothing (an empty ``--auth-token``, a
        missing file, a file of comments) is a SystemExit: it would turn auth off.
        """
        if any(not t.strip() for t in self.auth_token):
            raise SystemExit("fastingest: an --auth-token (or $FASTINGEST_AUTH_TOKENS) is empty")
        found = [t.strip() for t in self.auth_token]
        if self.auth_token_file is not None:
            try:
                lines = self.auth_token_file.read_text().splitlines()
            except OSError as exc:
                raise SystemExit(f"fastingest: cannot read --auth-token-file: {exc}") from None
            given = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
            if not given:
                raise SystemExit(
                    f"fastingest: --auth-token-file {self.auth_token_file} holds no token"
                )
            found += given
        return found


# In --help order.
OPTIONS: list[Option] = [f.metadata["option"] for f in fields(Settings) if "option" in f.metadata]


def _shown_default(opt: Option) -> str:
    value = {f.name: f.default for f in fields(Settings)}[opt.dest]
    if isinstance(value, tuple) and opt.dest == "listen":
        return f"default: {value[0]}:{value[1]}; "
    if value is None:  # the help text says what the default is derived from
        return ""
    return f"default: {value or 'none'}; "


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for opt in OPTIONS:
        env = " or ".join(f"${e}" for e in opt.env)
        parser.add_argument(
            opt.flag,
            dest=opt.dest,
            type=opt.type,
            choices=opt.choices,
            action="append" if opt.repeat else "store",
            default=None,
            metavar=None if opt.choices else opt.dest.upper(),
            help=f"{opt.help} [{_shown_default(opt)}env: {env}]",
        )


def resolve(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from parsed flags, then the environment, then the defaults."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        given = getattr(args, opt.dest, None)
        if given is not None:
            values[opt.dest] = tuple(given) if opt.repeat else given
            continue
        for name in opt.env:
            raw = environ.get(name)
            if raw is None or (raw == "" and not opt.repeat):
                continue
            try:
                if opt.repeat:  # set but empty stays "", so that tokens() can refuse it
                    values[opt.dest] = tuple(t.strip() for t in raw.split(",") if t.strip())
                    values[opt.dest] = values[opt.dest] or ("",)
                else:
                    value = opt.type(raw)
                    if opt.choices is not None and value not in opt.choices:
                        raise ValueError(f"choose from {', '.join(opt.choices)}")
                    values[opt.dest] = value
            except (ValueError, argparse.ArgumentTypeError) as exc:
                raise SystemExit(f"fastingest: ${name}={raw!r}: {exc}") from None
            break
    index = environ.get(WORKER_INDEX_ENV)
    if index is not None:
        values["worker_index"] = int(index)
    return Settings(**values)
