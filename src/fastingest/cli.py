"""``fastingest`` command line: ``fastingest serve [options]``, ``fastingest --version``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from fastingest import __version__
from fastingest.config import Settings, add_arguments, resolve
from fastingest.logs import configure as configure_logging
from fastingest.supervisor import EX_CONFIG, Supervisor

DESCRIPTION = """\
Take JSON payloads over HTTP and land every one of them in S3 or a directory.

  POST /ingest    payloads: a {"version","token","data":[...]} collection, a JSON
                  array, one JSON object (application/json), or NDJSON
                  (application/x-ndjson); gzip/deflate/zstd bodies accepted
  GET  /healthz   the process is alive
  GET  /readyz    requests can be taken and held (not draining, spool not full)

Every option has an environment variable twin; the command line wins. S3
endpoint, region and credentials come from the standard AWS chain
(AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_PROFILE, ...).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastingest",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fastingest {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the ingest server",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(serve)
    redrive = commands.add_parser(
        "redrive",
        help="upload the dead-letter directory to the sink, under the same keys",
        description="Upload every object in the dead-letter directory to the sink with its "
        "key, content type and metadata (conditional writes: an object already there counts "
        "as stored), and remove each once it is stored. Takes serve's options.",
    )
    add_arguments(redrive)
    return parser


def warn_stranded(root: Path, processes: int) -> None:
    from fastingest.spool import stranded

    for path, size in stranded(root, processes):
        logging.getLogger("fastingest").error(
            "spool %s holds %d bytes from a run with more processes: nothing replays it "
            "until fastingest starts with --processes %d or more",
            path,
            size,
            int(path.name) + 1,
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command not in ("serve", "redrive"):
        parser.print_help()
        return 2
    settings = resolve(args)
    configure_logging(settings.log_level, settings.log_format, settings.worker_index)
    try:
        check_sink_url(settings.sink_url)
        settings.check()
    except ValueError as exc:
        print(f"fastingest: {exc}", file=sys.stderr)
        return EX_CONFIG
    try:
        tokens = settings.tokens()
    except SystemExit as exc:
        print(exc.code, file=sys.stderr)
        return EX_CONFIG
    if not tokens and args.command == "serve" and settings.worker_index is None:
        logging.getLogger("fastingest").warning(
            "no --auth-token: anyone who can reach %s:%d can store payloads",
            *settings.listen,
        )
    if args.command == "redrive":
        return _run(_redrive(settings))
    if settings.worker_index is None:
        warn_stranded(settings.spool_root, settings.process_count)
    if settings.process_count > 1 and settings.worker_index is None:
        host, port = settings.listen
        supervisor = Supervisor(argv[argv.index("serve") + 1 :], settings.process_count, host, port)
        try:
            return supervisor.run()
        except SystemExit as exc:
            if not isinstance(exc.code, str):
                raise
            print(exc.code, file=sys.stderr)
            return EX_CONFIG
    from fastingest.server import serve  # aiohttp and aiobotocore load only to serve

    return _run(serve(settings))


def _run(main: Coroutine[Any, Any, int | None]) -> int:
    """Run `main` on uvloop where installed; a start-up SystemExit is one line and EX_CONFIG."""
    try:
        try:
            import uvloop
        except ImportError:
            rc = asyncio.run(main)
        else:
            rc = uvloop.run(main)
    except SystemExit as exc:
        if not isinstance(exc.code, str):
            raise
        print(exc.code, file=sys.stderr)
        return EX_CONFIG
    return rc or 0


def check_sink_url(url: str) -> None:
    """ValueError unless `url` names a sink fastingest can open (checked before serving)."""
    from fastingest.sinks import open_sink

    open_sink(url)


async def _redrive(settings: Settings) -> int:
    from fastingest.redrive import redrive
    from fastingest.sinks import open_sink

    root = settings.dead_letter_path
    if not root.is_dir():
        print(f"fastingest: no dead-letter directory at {root}", file=sys.stderr)
        return 1
    sink = open_sink(settings.sink_url, max_connections=settings.max_workers)
    await sink.start()
    try:
        stored, left = await redrive(root, sink)
    finally:
        await sink.close()
    logging.getLogger("fastingest").info(
        "redrive: %d objects stored in %r, %d left in %s", stored, sink, left, root
    )
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
