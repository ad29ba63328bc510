"""End-to-end HTTP benchmark: fastingest (and reference servers) under the same wrk load.

    python -m bench.http_bench --case ack                # --ack received|durable|uploaded
    python -m bench.http_bench --case anchors --n 1 10   # vs the Go design, pynaive, nginx
    python -m bench.http_bench --case ack --baseline /tmp/before   # a change, before/after
    python -m bench.http_bench --case landing --n 10     # Parquet and partitions vs NDJSON
    python -m bench.http_bench --case landing --n 10 --rows "fastingest ndjson" \
        "fastingest ndjson --partition-by type" --baseline /tmp/before   # some rows only

For each server: start its sink (moto_server on 127.0.0.1, or a directory), start
the server, warm up, measure for --duration seconds with wrk and
../shared/anchors/wrk/post.lua, stop it with SIGTERM, then read back and count
every payload that landed. Prints req/s, payloads/s, p50/p99, non-2xx, peak
RSS, landed vs acknowledged, bytes stored per payload, landed/s (what landed over the
seconds from the load's start until the server exited, having stored everything: the
rate it keeps up with, where payloads/s is the rate it accepts), CPU µs per payload
landed (the server's CPU time from listening to exit over what landed: time the host
steals is not in it, so it moves less from run to run than a rate), and each row's
ratio to the first row; writes
JSON and a PNG chart to bench/results/. With --runs K the servers are run in K
interleaved rounds, every other one in reverse order, and each row shows its median
round (every round is in the JSON): this host is shared, and one slow minute can halve
a single run. Each
row also says how much CPU time the hypervisor took from this VM while it was
measured ("steal"): a round with steal is a noisy round, and p99 feels it first.
The first server's ratio to each other one is also printed round by round (round k
against round k), with the median of those pairs and of the pairs where neither
round had more than --quiet-steal % of steal.

--mode pinned: server on CPU 1, wrk on CPU 0. --mode machine: nothing pinned.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import write_results

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ANCHORS = ROOT.parent / "shared" / "anchors"


@dataclass
class Server:
    name: str
    cmd: list[str]
    path: str = "/ingest"
    env: dict[str, str] = field(default_factory=dict)
    sink: str = "file"  # file | s3 | null
    counts_landed: bool = True


@dataclass
class Result:
    name: str
    n: int
    mode: str
    sink: str
    req_s: float
    payloads_s: float
    p50_ms: float
    p99_ms: float
    non2xx: int
    sock_errors: int
    acked: int
    landed: int | None
    rss_mib: float
    stop_rc: int
    stop_s: float
    steal_pct: float | None = None  # of all CPU time while measuring (None: not Linux)
    stored_bytes: int | None = None  # of the objects that landed (file sink)
    # Landed payloads over the seconds from the load's start to the server's exit (it
    # stores everything before exiting): the rate it keeps up with, not only accepts.
    landed_s: float | None = None
    # The server's CPU seconds from listening to exit (its workers' included) over what
    # landed: on a shared host this moves less than a rate does, as stolen time is not in it.
    cpu_us_per_landed: float | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def say(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


class Moto:
    """moto_server on 127.0.0.1 with a fresh bucket; never pinned (it shares the machine)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)
        self.url = f"http://127.0.0.1:{self.port}"
        import boto3

        self.s3 = boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        )

    def bucket(self, name: str) -> str:
        self.s3.create_bucket(Bucket=name)
        return name

    def landed(self, bucket: str) -> int:
        total = 0
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for entry in page.get("Contents", []):
                total += count_payloads(
                    self.s3.get_object(Bucket=bucket, Key=entry["Key"])["Body"].read()
                )
        return total

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def count_payloads(data: bytes) -> int:
    """One JSON document = 1; NDJSON = 1 per non-empty line; gzip/zstd by magic bytes;
    Parquet: its rows."""
    if data[:4] == b"PAR1":
        import io

        import pyarrow.parquet as pq

        return int(pq.ParquetFile(io.BytesIO(data)).metadata.num_rows)
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    elif data[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard

        data = zstandard.ZstdDecompressor().stream_reader(data).read()
    lines = [ln for ln in data.split(b"\n") if ln.strip()]
    return 1 if len(lines) == 1 else len(lines)


def landed_in(directory: Path) -> tuple[int, int]:
    """(payloads, bytes) of the objects under `directory`."""
    objects = [
        p.read_bytes()
        for p in directory.rglob("*")
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".error.json")
    ]
    return sum(map(count_payloads, objects)), sum(map(len, objects))


def peak_rss_mib(pid: int) -> float:
    """VmHWM of `pid` and its children (MiB)."""
    total = 0
    pids = [pid]
    try:
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def cpu_ticks() -> tuple[int, int] | None:
    """(steal, total) jiffies of all CPUs so far, from /proc/stat; None where there is none."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(f) for f in fields[:8]]  # user .. steal; guest time is inside user
    return ticks[7], sum(ticks)


def group_cpu(pgid: int) -> float:
    """CPU seconds the live processes of group `pgid` have used so far (0 without /proc)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[2]) == pgid:  # state, ppid, pgrp, ...; utime and stime at 11, 12
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def steal_since(before: tuple[int, int] | None) -> float | None:
    after = cpu_ticks()
    if before is None or after is None or after[1] == before[1]:
        return None
    return 100 * (after[0] - before[0]) / (after[1] - before[1])


def wrk(
    port: int, path: str, n: int, seconds: float, args: argparse.Namespace, pin: str | None
) -> dict:
    cmd = [
        "wrk",
        "-t1",
        f"-c{args.connections}",
        f"-d{int(seconds)}s",
        "--timeout",
        "10s",
        "-s",
        str(args.anchors / "wrk" / "post.lua"),
        f"http://127.0.0.1:{port}{path}",
        "--",
        str(n),
    ]
    if pin is not None:
        cmd = ["taskset", "-c", pin, *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("WRKJSON "))
    return json.loads(line.removeprefix("WRKJSON "))


def run_one(
    server: Server, n: int, args: argparse.Namespace, moto: Moto | None, index: int
) -> Result:
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="fi-bench-"))
    env = {
        **os.environ,
        "PORT": str(port),
        "LISTEN": f"127.0.0.1:{port}",
        "MAX_WORKERS": str(args.max_workers),
        "MAX_QUEUE": str(args.max_queue),
        "GOMAXPROCS": "1" if args.mode == "pinned" else "2",
        "PROCS": "1" if args.mode == "pinned" else "2",
        "NGINX_WORKERS": "1" if args.mode == "pinned" else "2",
        "FILE_DIR": str(work / "objects"),
        "SINK": server.sink,
        **server.env,
    }
    bucket = None
    if server.sink == "s3":
        assert moto is not None
        bucket = moto.bucket(f"bench-{index}-{int(time.time())}")
        env.update(
            S3_ENDPOINT=moto.url,
            S3_BUCKET=bucket,
            AWS_ENDPOINT_URL=moto.url,
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_REGION="us-east-1",
        )
        env.setdefault("FASTINGEST_SINK", f"s3://{bucket}")
    else:
        env.setdefault("FASTINGEST_SINK", (work / "objects").as_uri())
    env.setdefault("FASTINGEST_DATA_DIR", str(work / "data"))
    cmd = server.cmd
    if args.mode == "pinned":
        cmd = ["taskset", "-c", "1", *cmd]
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=open(work / "server.log", "w"),
        start_new_session=True,
    )
    try:
        wait_port(port)
        started_cpu = group_cpu(proc.pid)  # its start-up (imports) is not the load's
        pin = "0" if args.mode == "pinned" else None
        warm = wrk(port, server.path, n, args.warmup, args, pin)
        say(f"  {server.name} N={n}: warmed up, measuring {args.duration}s ...")
        ticks = cpu_ticks()
        run = wrk(port, server.path, n, args.duration, args, pin)
        steal = steal_since(ticks)
        rss = peak_rss_mib(proc.pid)
    finally:
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        rc, cpu_s = stop(proc, 60)
        stopped = time.monotonic() - started
    acked = sum((w["requests"] - w["err_status"]) * n for w in (warm, run))
    landed = stored = None
    if server.counts_landed and server.sink == "s3":
        assert moto is not None and bucket is not None
        landed = moto.landed(bucket)
    elif server.counts_landed and server.sink == "file":
        landed, stored = landed_in(work / "objects")
    shutil.rmtree(work, ignore_errors=True)
    seconds = run["duration_us"] / 1e6
    ok = run["requests"] - run["err_status"]
    loaded = (warm["duration_us"] + run["duration_us"]) / 1e6
    landed_s = None if landed is None else landed / (loaded + stopped)
    cpu_us = (cpu_s - started_cpu) / landed * 1e6 if landed else None
    return Result(
        server.name,
        n,
        args.mode,
        server.sink,
        ok / seconds,
        ok * n / seconds,
        run["lat_p50_us"] / 1000,
        run["lat_p99_us"] / 1000,
        run["err_status"],
        run["err_connect"] + run["err_read"] + run["err_write"] + run["err_timeout"],
        acked,
        landed,
        rss,
        rc,
        stopped,
        steal,
        stored,
        landed_s,
        cpu_us,
    )


def stop(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, float]:
    """Reap `proc` (SIGKILL to its group past `timeout`): (exit code, CPU seconds it and
    the children it reaped used), from wait4, which Popen.wait does not give."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def fastingest(name: str, *extra: str, sink: str = "file") -> Server:
    return Server(name, [sys.executable, "-m", "fastingest", "serve", *extra], sink=sink)


def reference(name: str, *cmd: str) -> Server:
    """A reference server from the anchors folder: serves on /, stores nothing we count."""
    return Server(name, list(cmd), path="/", sink="null", counts_landed=False)


def cases(args: argparse.Namespace) -> list[Server]:
    servers = _cases(args)
    if args.rows:
        servers = [s for s in servers if s.name in args.rows]
    if args.baseline is None:
        return servers
    # Each fastingest row again, run from another source tree: a change's before and after
    # measured in the same rounds.
    src = str(args.baseline.resolve() / "src")
    twins = [
        Server(f"{s.name} (baseline)", s.cmd, s.path, {**s.env, "PYTHONPATH": src}, s.sink)
        for s in servers
        if s.name.startswith("fastingest")
    ]
    return [x for pair in zip(servers, twins, strict=False) for x in pair] + servers[len(twins) :]


def _cases(args: argparse.Namespace) -> list[Server]:
    sink = args.sink
    if args.case == "ack":
        return [
            fastingest(f"fastingest ack={a}", "--ack", a, sink=sink)
            for a in ("received", "durable", "uploaded")
        ]
    # post.lua's payloads: "type" has 6 values (its "ts" spreads over 28 hours, so with
    # --time-field ts a chunk of 10 falls into ~10 of 168 partitions: not a rate case).
    if args.case == "landing":
        ack = ("--ack", args.ack)
        parts = ("--partition-by", "type")
        return [
            fastingest("fastingest ndjson", *ack, sink=sink),
            fastingest("fastingest parquet", *ack, "--format", "parquet", sink=sink),
            fastingest("fastingest ndjson --partition-by type", *ack, *parts, sink=sink),
            fastingest(
                "fastingest parquet --partition-by type",
                *ack,
                "--format",
                "parquet",
                *parts,
                sink=sink,
            ),
        ]
    a = args.anchors
    servers = [
        fastingest("fastingest", "--ack", args.ack, sink=sink),
        # The same server on aiohttp's web layer: what the lean front end is worth.
        fastingest("fastingest --http aiohttp", "--ack", args.ack, "--http", "aiohttp", sink=sink),
    ]
    if (a / "goseed" / "goseed").exists():
        servers.append(reference("goseed null", str(a / "goseed" / "goseed")))
        servers.append(
            Server(f"goseed {sink}", [str(a / "goseed" / "goseed")], path="/", sink=sink)
        )
    else:
        say(f"skipping goseed: build it with {a}/goseed/build.sh")
    servers.append(reference("pynaive null", sys.executable, str(a / "pynaive" / "server.py")))
    if shutil.which("nginx"):
        servers.append(reference("nginx 204 (HTTP limit)", str(a / "limit" / "run_nginx.sh")))
    return servers


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def worse(a: float | None, b: float | None) -> float | None:
    """The higher steal of a pair of rounds; None where either could not be read."""
    return None if a is None or b is None else max(a, b)


def table(results: list[Result]) -> str:
    base = results[0]
    rows = [
        "| server | N | req/s | payloads/s | vs first | landed/s | vs first | p50 ms | p99 ms | "
        "non-2xx | landed / acked | B/payload | CPU µs/landed | vs first | RSS MiB | stop | "
        "steal % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        landed = "n/a" if r.landed is None else f"{r.landed:,} / {r.acked:,}"
        per = "n/a" if not r.stored_bytes or not r.landed else f"{r.stored_bytes / r.landed:.0f}"
        kept = cpu = "n/a | n/a"
        if r.landed_s is not None and base.landed_s:
            kept = f"{r.landed_s:,.0f} | {r.landed_s / base.landed_s:.2f}x"
        if r.cpu_us_per_landed is not None and base.cpu_us_per_landed:
            cpu = f"{r.cpu_us_per_landed:.2f} | {r.cpu_us_per_landed / base.cpu_us_per_landed:.2f}x"
        rows.append(
            f"| {r.name} | {r.n} | {r.req_s:,.0f} | {r.payloads_s:,.0f} | "
            f"{r.payloads_s / base.payloads_s:.2f}x | {kept} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
            f"{r.non2xx} | {landed} | {per} | {cpu} | {r.rss_mib:.0f} | rc={r.stop_rc} "
            f"{r.stop_s:.1f}s | {percent(r.steal_pct)} |"
        )
    return "\n".join(rows)


def chart(results: list[Result], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib not installed: no chart (pip install matplotlib)")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.6 * len(results) + 2))
    labels = [f"{r.name} N={r.n}" for r in results]
    bars = ax1.barh(labels, [r.payloads_s for r in results], color="#3b7dd8")
    ax1.set_xscale("log")  # nginx's HTTP limit is 10-100x the rest
    ax1.set_xlabel("payloads/s (log scale)")
    ax1.bar_label(bars, [f"{r.payloads_s:,.0f}" for r in results], padding=3, fontsize=8)
    ax1.invert_yaxis()
    bars = ax2.barh(labels, [r.p99_ms for r in results], color="#d8743b")
    ax2.set_xscale("log")
    ax2.set_xlabel("p99 latency, ms (log scale)")
    ax2.bar_label(bars, [f"{r.p99_ms:,.1f}" for r in results], padding=3, fontsize=8)
    ax2.invert_yaxis()
    ax2.set_yticklabels([])
    fig.suptitle(f"fastingest http_bench ({results[0].mode}, {time.strftime('%Y-%m-%d')})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def pairs(runs: dict[tuple[str, int], list[Result]], quiet: float) -> list[dict[str, Any]]:
    """The first server's payloads/s over each other's, round by round, with their medians.

    Round k of two servers ran a minute or so apart, so a pair's ratio moves with the
    host less than a ratio of medians taken from different rounds. ``quiet`` keeps
    the pairs where neither round lost more than `quiet` % of the CPU to steal: the
    ratio this code gets on an undisturbed host. Where steal cannot be read (not
    Linux), no pair counts as quiet.
    """
    names = list(dict.fromkeys(name for name, _ in runs))
    out = []
    for (name, n), theirs in runs.items():
        mine = runs.get((names[0], n))
        if name == names[0] or not mine:
            continue
        both = [
            (a.payloads_s / b.payloads_s, worse(a.steal_pct, b.steal_pct))
            for a, b in zip(mine, theirs, strict=False)
            if b.payloads_s > 0
        ]
        ratios = [ratio for ratio, _ in both]
        calm = [ratio for ratio, steal in both if steal is not None and steal <= quiet]
        rounds = [{"ratio": ratio, "steal_pct": steal} for ratio, steal in both]
        kept = [a.landed_s / b.landed_s for a, b in zip(mine, theirs, strict=False)
                if a.landed_s and b.landed_s]  # fmt: skip
        # CPU per payload landed, theirs over mine: above 1x where they cost more
        cpu = [b.cpu_us_per_landed / a.cpu_us_per_landed for a, b in zip(mine, theirs, strict=False)
               if a.cpu_us_per_landed and b.cpu_us_per_landed]  # fmt: skip
        out.append(
            {
                "n": n,
                "over": name,
                "rounds": rounds,
                "median": statistics.median(ratios) if ratios else None,
                "quiet_median": statistics.median(calm) if calm else None,
                "quiet_rounds": len(calm),
                "landed_rounds": kept,
                "landed_median": statistics.median(kept) if kept else None,
                "cpu_rounds": cpu,
                "cpu_median": statistics.median(cpu) if cpu else None,
            }
        )
    return out


def pairs_text(found: list[dict[str, Any]], first: str, quiet: float) -> str:
    lines = [
        f"\n{first} over each, payloads/s, round by round (the higher steal % of the pair; "
        f"quiet: no more than {quiet:g}%):"
    ]
    for p in found:
        each = " / ".join(f"{r['ratio']:.2f}x ({percent(r['steal_pct'])})" for r in p["rounds"])
        calm = "none" if p["quiet_median"] is None else f"{p['quiet_median']:.2f}x"
        median = "n/a" if p["median"] is None else f"{p['median']:.2f}x"
        lines.append(
            f"  N={p['n']}, over {p['over']}: {each}; median {median}, "
            f"quiet {calm} ({p['quiet_rounds']} of {len(p['rounds'])})"
        )
        if p.get("landed_median") is not None:
            kept = " / ".join(f"{k:.2f}x" for k in p["landed_rounds"])
            lines.append(
                f"    landed/s (load start to exit): {kept}; median {p['landed_median']:.2f}x"
            )
        if p.get("cpu_median") is not None:
            cpu = " / ".join(f"{c:.2f}x" for c in p["cpu_rounds"])
            lines.append(
                f"    CPU per payload landed, {p['over']} over {first}: {cpu}; "
                f"median {p['cpu_median']:.2f}x"
            )
    return "\n".join(lines)


def median_run(runs: list[Result]) -> Result:
    """The run with the median req/s (the lower middle one of an even count)."""
    return sorted(runs, key=lambda r: r.req_s)[(len(runs) - 1) // 2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--case", choices=["ack", "anchors", "landing"], default="ack")
    ap.add_argument("--n", type=int, nargs="+", default=[1], help="payloads per request")
    ap.add_argument("--mode", choices=["pinned", "machine"], default="pinned")
    ap.add_argument("--sink", choices=["file", "s3"], default="file")
    ap.add_argument(
        "--ack", default="received", help="fastingest's ack level in --case anchors and landing"
    )
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--warmup", type=float, default=3)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--max-workers", type=int, default=64)
    ap.add_argument("--max-queue", type=int, default=10000)
    ap.add_argument("--anchors", type=Path, default=DEFAULT_ANCHORS)
    ap.add_argument(
        "--runs",
        type=int,
        default=1,
        help="rounds over every server, interleaved; each row reports its median run",
    )
    ap.add_argument(
        "--quiet-steal",
        type=float,
        default=1.0,
        help="steal %% up to which a pair of rounds counts as quiet in the round-by-round ratios",
    )
    ap.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="a source tree of fastingest (extensions built in place) to run beside this one, "
        "row by row: a change's before/after in the same rounds",
    )
    ap.add_argument(
        "--rows",
        nargs="+",
        default=None,
        help="run only these rows of the case, by name (e.g. 'fastingest ndjson')",
    )
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--redraw",
        type=Path,
        default=None,
        help="print the table and draw the chart of a saved results JSON, run nothing",
    )
    args = ap.parse_args(argv)
    if args.redraw is not None:
        saved = [Result(**r) for r in json.loads(args.redraw.read_text())["results"]]
        print(table(saved))
        chart(saved, args.redraw.with_suffix(".png"))
        return 0
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk")
    if not (args.anchors / "wrk" / "post.lua").exists():
        sys.exit(f"no {args.anchors}/wrk/post.lua: point --anchors at the reference folder")

    moto = Moto() if args.sink == "s3" else None
    runs: dict[tuple[str, int], list[Result]] = {}  # every run, by (server, N)
    try:
        servers = cases(args)
        total = len(servers) * len(args.n) * args.runs
        for n in args.n:
            # Rounds interleave the servers, so a slow minute on this shared host falls on
            # all of them rather than on one row. A server's place in a round moves its result
            # by several %, so every other round runs them in reverse.
            for round_ in range(args.runs):
                order = servers if round_ % 2 == 0 else servers[::-1]
                for server in order:
                    done = sum(len(r) for r in runs.values())
                    say(f"[{done + 1}/{total}] {server.name}, N={n}, round {round_ + 1}")
                    index = servers.index(server)
                    result = run_one(server, n, args, moto, index)
                    runs.setdefault((server.name, n), []).append(result)
    finally:
        if moto is not None:
            moto.close()
    results = [median_run(r) for r in runs.values()]
    print(table(results))
    if args.runs > 1:
        print("\nreq/s (steal %, p99 ms) of each round (the table shows each row's median round):")
        for (name, n), rs in runs.items():
            rounds = " / ".join(
                f"{r.req_s:,.0f} ({percent(r.steal_pct)}, {r.p99_ms:.2f})" for r in rs
            )
            print(f"  {name}, N={n}: {rounds}")
    found = pairs(runs, args.quiet_steal) if args.runs > 1 else []
    if found:
        print(pairs_text(found, servers[0].name, args.quiet_steal))
    lost = [r for rs in runs.values() for r in rs if r.landed is not None and r.landed < r.acked]
    for r in lost:
        print(f"LOST: {r.name} N={r.n} landed {r.landed} of {r.acked} acknowledged")
    meta = {"args": {k: str(v) for k, v in vars(args).items()}}
    every = [asdict(r) for rs in runs.values() for r in rs]
    rows = [asdict(r) for r in results]
    out = write_results(
        f"http_bench-{args.case}", args.out, meta, results=rows, runs=every, pairs=found
    )
    chart(results, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
