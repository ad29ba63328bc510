"""Benchmarks: each prints ratios against baselines run side by side and writes JSON."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(
    ap: argparse.ArgumentParser, argv: list[str] | None, *, reps: int
) -> argparse.Namespace:
    """Add the options every in-process bench has (--reps, --cpu, --out), parse, and pin."""
    ap.add_argument("--reps", type=int, default=reps, help="runs of each; the median is reported")
    ap.add_argument("--cpu", default=None, help="pin to these CPUs, e.g. 1 or 0,1")
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default bench/results/)")
    args = ap.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {int(c) for c in args.cpu.split(",")})
    return args


def write_results(name: str, out: Path | None, meta: dict[str, Any], **body: Any) -> Path:
    """``bench/results/<name>-<time>.json`` (or `out`), with the machine it ran on in meta."""
    RESULTS.mkdir(exist_ok=True)
    out = out or RESULTS / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    where = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
    }
    out.write_text(json.dumps({"meta": where | meta, **body}, indent=2))
    return out
