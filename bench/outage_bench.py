"""How long the spool rides out a store outage, and how fast the backlog drains after it.

    python -m bench.outage_bench --outage 4 --n 10 --rates 20000 5000 1000

fastingest (defaults, one process, pinned to CPU 1) stores into moto_server through a
TCP relay on 127.0.0.1 that this script can take down (connections refused, as when an
endpoint is gone). wrk (CPU 0, ../shared/anchors/wrk/post.lua) loads it for --outage
seconds with the relay down, then the relay comes back. Measured:

- accepted payloads/s during the outage, and non-2xx answers (there are none while the
  spool has room: keep --outage short enough that it does not fill);
- spool bytes per accepted payload, hence how long a spool of --spool-gib lasts at the
  measured rate and at each --rates figure: ride-out = spool size / (bytes per payload x rate);
- the drain: seconds from the relay's return until every accepted payload is in the
  bucket, and the payloads/s that makes;
- landed vs acknowledged, read back from the bucket.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from bench import write_results
from bench.http_bench import DEFAULT_ANCHORS, Moto, free_port, wait_port


class Relay:
    """A TCP relay to `upstream` that refuses connections while down (its socket closed)."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.up()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def up(self) -> None:
        start = asyncio.start_server(self._client, "127.0.0.1", self.port, reuse_address=True)
        self._server = asyncio.run_coroutine_threadsafe(start, self.loop).result()

    def down(self) -> None:
        assert self._server is not None
        server, self._server = self._server, None
        server.close()  # refuses new connections; open ones die with their next request
        asyncio.run_coroutine_threadsafe(server.wait_closed(), self.loop).result(10)


def metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            found[name] = float(value)
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--outage", type=float, default=4, help="seconds the store is down")
    ap.add_argument("--n", type=int, default=10, help="payloads per request")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--spool-gib", type=float, default=1.0, help="spool size to project onto")
    ap.add_argument(
        "--rates", type=float, nargs="+", default=[20_000, 100_000], help="payloads/s to project"
    )
    ap.add_argument("--anchors", type=Path, default=DEFAULT_ANCHORS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk")
    moto = Moto()
    relay = Relay(moto.port)
    work = Path(tempfile.mkdtemp(prefix="fi-outage-"))
    bucket = moto.bucket(f"outage-{int(time.time())}")
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FASTINGEST_")},
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{relay.port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_REGION": "us-east-1",
    }
    cmd = ["taskset", "-c", "1", sys.executable, "-m", "fastingest", "serve", "--processes", "1"]
    server = subprocess.Popen(
        [*cmd, "--listen", f"127.0.0.1:{port}", "--sink", f"s3://{bucket}", "--log-format", "json"],
        cwd=work,
        env=env,
        stderr=open(work / "server.log", "w"),
    )
    try:
        wait_port(port)
        relay.down()
        print(f"store down; loading for {args.outage:g}s", file=sys.stderr)
        wrk = subprocess.run(
            [
                "taskset", "-c", "0", "wrk", "-t1", f"-c{args.connections}",
                f"-d{int(args.outage)}s", "--timeout", "10s",
                "-s", str(args.anchors / "wrk" / "post.lua"),
                f"http://127.0.0.1:{port}/ingest", "--", str(args.n),
            ],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        done = json.loads(
            next(ln for ln in wrk.stdout.splitlines() if ln.startswith("WRKJSON "))[8:]
        )
        during = metrics(port)
        accepted = during["fastingest_payloads_accepted_total"]
        spool = during["fastingest_spool_bytes"]
        per_payload = spool / accepted
        relay.up()
        back = time.monotonic()
        print("store back; draining", file=sys.stderr)
        while metrics(port)["fastingest_payloads_uploaded_total"] < accepted:
            if time.monotonic() - back > 600:
                sys.exit("the backlog did not drain in 10 minutes")
            time.sleep(0.2)
        drain = time.monotonic() - back
        server.send_signal(signal.SIGTERM)
        rc = server.wait(60)
        landed = moto.landed(bucket)
    finally:
        if server.poll() is None:
            server.kill()
        moto.close()
    rate = accepted / args.outage
    spool_bytes = args.spool_gib * 2**30
    result = {
        "outage_s": args.outage,
        "n": args.n,
        "accepted": int(accepted),
        "accepted_per_s": rate,
        "non2xx": done["err_status"],
        "spool_bytes": spool,
        "spool_bytes_per_payload": per_payload,
        "drain_s": drain,
        "drain_payloads_per_s": accepted / drain,
        "landed": landed,
        "stop_rc": rc,
        "ride_out_s": {
            "measured": spool_bytes / (per_payload * rate),
            **{f"{r:g}": spool_bytes / (per_payload * r) for r in args.rates},
        },
    }
    print(
        f"| outage | accepted payloads/s | non-2xx | spool bytes/payload | drain | "
        f"landed / acked |\n|---|---:|---:|---:|---:|---|\n"
        f"| {args.outage:g} s | {rate:,.0f} | {result['non2xx']} | {per_payload:.0f} | "
        f"{drain:.1f} s ({accepted / drain:,.0f} payloads/s) | {landed:,} / {int(accepted):,} |"
    )
    print(f"\n{args.spool_gib:g} GiB of spool rides out, at N={args.n}:")
    for label, seconds in result["ride_out_s"].items():
        at = f"{rate:,.0f} payloads/s (measured)" if label == "measured" else f"{label} payloads/s"
        print(f"  {at}: {seconds / 60:.1f} min")
    if landed != int(accepted):
        print(f"LOST or DUPLICATED: landed {landed} of {int(accepted)} acknowledged")
    out = write_results(
        "outage_bench", args.out, {"args": vars(args) | {"anchors": "..."}}, **result
    )
    print(f"\nwrote {out}")
    return 0 if landed == int(accepted) else 1


if __name__ == "__main__":
    sys.exit(main())
