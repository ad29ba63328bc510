"""The p99 against the request rate, over every http_bench run already in bench/results/.

    python -m bench.p99_rate [--steal 0.5] [--target 5.0] [--mode pinned] [RUN.json ...]

No load: this reads the rounds that ``http_bench`` wrote. With C connections kept busy,
Little's law makes the mean latency C / req_s, so each round's p99 divided by that
is its tail factor k: how many mean latencies the slowest 1% took. For each server, N
and sink the table shows k's median and range over the rounds at no more than
``--steal`` percent steal (a paused vCPU stalls every request in flight at once, so
rounds with steal say nothing about the server). For fastingest at N=1 on S3, the row
the 5 ms p99 target is set on, it then shows the request rate at which k puts the
p99 at ``--target`` ms, and how many rounds above and below that rate met the target.
Results go to ``bench/results/p99_rate-<time>.json`` with a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import RESULTS, write_results

TARGET_ROW = ("fastingest", 1, "s3")


def little(k: float, connections: int, x: float) -> float:
    """k mean latencies in ms at x req/s, or the req/s at which k mean latencies take x ms.

    Little's law with every connection busy: the two are the same expression.
    """
    return k * 1000.0 * connections / x


@dataclass(frozen=True, slots=True)
class Round:
    run: str  # the results file's stem
    name: str
    n: int
    sink: str
    req_s: float
    p99_ms: float
    steal_pct: float
    connections: int

    @property
    def row(self) -> tuple[str, int, str]:
        return self.name, self.n, self.sink

    @property
    def mean_ms(self) -> float:
        """Little's law: every connection always has one request in flight."""
        return little(1.0, self.connections, self.req_s)

    @property
    def k(self) -> float:
        return self.p99_ms / self.mean_ms


def load(paths: list[Path], mode: str, steal: float) -> list[Round]:
    rounds = []
    for path in paths:
        doc = json.loads(path.read_text())
        connections = int(doc["meta"]["args"]["connections"])
        for r in doc.get("runs", ()):  # early files kept only medians, without steal
            if r["mode"] != mode or r.get("steal_pct") is None or r["steal_pct"] > steal:
                continue
            if r["req_s"] <= 0:
                continue
            rounds.append(
                Round(
                    path.stem,
                    r["name"],
                    r["n"],
                    r["sink"],
                    r["req_s"],
                    r["p99_ms"],
                    r["steal_pct"],
                    connections,
                )
            )
    return rounds


def summarise(rounds: list[Round]) -> list[dict[str, object]]:
    groups: dict[tuple[str, int, str], list[Round]] = {}
    for r in rounds:
        groups.setdefault(r.row, []).append(r)
    rows = []
    for (name, n, sink), rs in sorted(groups.items()):
        ks = [r.k for r in rs]
        rows.append(
            {
                "name": name,
                "n": n,
                "sink": sink,
                "rounds": len(rs),
                "k_median": statistics.median(ks),
                "k_min": min(ks),
                "k_max": max(ks),
                "req_s_median": statistics.median(r.req_s for r in rs),
                "p99_ms_median": statistics.median(r.p99_ms for r in rs),
            }
        )
    return rows


def threshold(rs: list[Round], target_ms: float) -> dict[str, object]:
    """The rate at which these rounds' k puts their p99 at the target, and how it held."""
    connections = rs[0].connections
    k_med = statistics.median(r.k for r in rs)
    rate = little(k_med, connections, target_ms)
    above = [r for r in rs if r.req_s >= rate]
    below = [r for r in rs if r.req_s < rate]
    return {
        "target_ms": target_ms,
        "connections": connections,
        "rate_at_k_median": rate,
        "rate_at_k_max": little(max(r.k for r in rs), connections, target_ms),
        "above": len(above),
        "above_met": sum(r.p99_ms <= target_ms for r in above),
        "below": len(below),
        "below_met": sum(r.p99_ms <= target_ms for r in below),
        "fastest_miss_req_s": max((r.req_s for r in rs if r.p99_ms > target_ms), default=None),
        "slowest_hit_req_s": min((r.req_s for r in rs if r.p99_ms <= target_ms), default=None),
    }


def table(rows: list[dict[str, object]]) -> str:
    out = [
        f"{'server':<28} {'N':>3} {'sink':<5} {'rounds':>6} {'k median':>9} "
        f"{'k range':>11} {'req/s':>9} {'p99 ms':>7}"
    ]
    for row in rows:
        out.append(
            f"{row['name']:<28} {row['n']:>3} {row['sink']:<5} {row['rounds']:>6} "
            f"{row['k_median']:>9.2f} {row['k_min']:>5.2f}-{row['k_max']:<5.2f} "
            f"{row['req_s_median']:>9,.0f} {row['p99_ms_median']:>7.2f}"
        )
    return "\n".join(out)


def chart(rs: list[Round], target: float, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart (pip install matplotlib)", file=sys.stderr)
        return
    ks = sorted(r.k for r in rs)
    fig, ax = plt.subplots(figsize=(8, 5))
    hit = [r for r in rs if r.p99_ms <= target]
    miss = [r for r in rs if r.p99_ms > target]
    ax.scatter(
        [r.req_s for r in hit],
        [r.p99_ms for r in hit],
        color="#3b7dd8",
        label=f"rounds at <= {target:g} ms",
    )
    ax.scatter(
        [r.req_s for r in miss],
        [r.p99_ms for r in miss],
        color="#d8743b",
        label=f"rounds over {target:g} ms",
    )
    xs = [min(r.req_s for r in rs) * 0.95 + i * 250 for i in range(80)]
    xs = [x for x in xs if x <= max(r.req_s for r in rs) * 1.05]
    for k, style, which in (
        (ks[0], ":", "min"),
        (statistics.median(ks), "-", "median"),
        (ks[-1], ":", "max"),
    ):
        ax.plot(
            xs,
            [little(k, rs[0].connections, x) for x in xs],
            "k" + style,
            lw=1,
            label=f"k = {k:.2f} ({which})",
        )
    ax.axhline(target, color="#888", lw=1)
    ax.set_xlabel("acknowledged req/s (one core, N=1, S3)")
    ax.set_ylabel("p99 latency, ms")
    ax.set_title(
        f"fastingest p99 = k x {rs[0].connections} connections / req/s ({len(rs)} quiet rounds)"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steal", type=float, default=0.5, help="most steal %% a round may have")
    ap.add_argument("--target", type=float, default=5.0, help="p99 target in ms")
    ap.add_argument("--mode", default="pinned", choices=["pinned", "machine"])
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default bench/results/)")
    ap.add_argument("runs", nargs="*", type=Path, help="http_bench JSON files (default: all)")
    args = ap.parse_args(argv)

    paths = args.runs or sorted(RESULTS.glob("http_bench-*.json"))
    rounds = load(paths, args.mode, args.steal)
    if not rounds:
        sys.exit(f"no {args.mode} rounds at <= {args.steal}% steal in {RESULTS}")
    rows = summarise(rounds)
    target_rows = [r for r in rounds if r.row == TARGET_ROW]
    limit = threshold(target_rows, args.target) if target_rows else {}
    print(
        f"{len(rounds)} {args.mode} rounds at <= {args.steal}% steal from {len(paths)} runs; "
        "k = p99 / (connections / req/s)"
    )
    print(table(rows))
    if limit:
        print(
            f"\nfastingest N=1 S3: p99 = {limit['target_ms']:g} ms at "
            f"{limit['rate_at_k_median']:,.0f} req/s (k median), "
            f"{limit['rate_at_k_max']:,.0f} (k max); rounds at or above "
            f"{limit['rate_at_k_median']:,.0f}: {limit['above_met']} of {limit['above']} met it, "
            f"below: {limit['below_met']} of {limit['below']}"
        )
    out = write_results(
        "p99_rate",
        args.out,
        {"args": {k: str(v) for k, v in vars(args).items()}, "files": [p.name for p in paths]},
        groups=rows,
        threshold=limit,
        rounds=[asdict(r) | {"k": r.k} for r in rounds],
    )
    if limit:
        chart(target_rows, args.target, out.with_suffix(".png"))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
