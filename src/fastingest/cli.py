"""``fastingest`` command line: ``fastingest serve [options]``, ``fastingest --version``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from fastingest import __version__
from fastingest.config import add_arguments, resolve
from fastingest.logs import configure as configure_logging

DESCRIPTION = """\
Take JSON payloads over HTTP and land every one of them in S3 or a directory.

  POST /ingest    payloads: a {"version","token","data":[...]} collection, a JSON
                  array, one JSON object (application/json), or NDJSON
                  (application/x-ndjson); gzip/deflate/zstd bodies accepted
  GET  /healthz   the process is alive
  GET  /readyz    the sink is reachable and the server is not draining

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
    if args.command != "serve":
        parser.print_help()
        return 2
    settings = resolve(args)
    configure_logging(settings.log_level, settings.log_format)
    if settings.worker_index is None:
        warn_stranded(settings.spool_root, settings.process_count)
    if settings.process_count > 1 and settings.worker_index is None:
        from fastingest.supervisor import Supervisor

        host, port = settings.listen
        return Supervisor(argv[argv.index("serve") + 1 :], settings.process_count, host, port).run()
    from fastingest.server import serve  # aiohttp and aiobotocore load only to serve

    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
