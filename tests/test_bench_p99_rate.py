"""bench.p99_rate's arithmetic on http_bench files built here (no load, no server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import p99_rate


def _run(path: Path, rounds: list[tuple[str, float, float, float | None]]) -> Path:
    runs = [
        {
            "name": name,
            "n": 1,
            "mode": "pinned",
            "sink": "s3",
            "req_s": req_s,
            "p99_ms": p99_ms,
            "steal_pct": steal,
        }
        for name, req_s, p99_ms, steal in rounds
    ]
    path.write_text(json.dumps({"meta": {"args": {"connections": "64"}}, "runs": runs}))
    return path


def test_k_threshold_and_steal_filter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 64 connections at 32k req/s: a mean latency of 2 ms, so p99 6 ms is k = 3.
    a = _run(
        tmp_path / "http_bench-a.json",
        [
            ("fastingest", 32_000, 6.0, 0.1),
            ("fastingest", 64_000, 3.0, 0.0),  # k 3: at the target's rate (38,400) or above
            ("fastingest", 40_000, 4.0, 0.2),  # k 2.5
            ("fastingest", 50_000, 9.0, 4.0),  # steal: left out
            ("nginx", 128_000, 1.0, 0.0),  # k 2
        ],
    )
    b = _run(tmp_path / "http_bench-b.json", [("fastingest", 30_000, 5.0, None)])  # no steal
    out = tmp_path / "p99.json"
    p99_rate.main(["--out", str(out), "--target", "5", str(a), str(b)])

    doc = json.loads(out.read_text())
    groups = {g["name"]: g for g in doc["groups"]}
    assert groups["fastingest"]["rounds"] == 3
    assert groups["fastingest"]["k_median"] == pytest.approx(3.0)
    assert groups["fastingest"]["k_min"] == pytest.approx(2.5)
    assert groups["nginx"]["k_median"] == pytest.approx(2.0)
    limit = doc["threshold"]
    assert limit["rate_at_k_median"] == pytest.approx(3.0 * 64_000 / 5)
    assert (limit["above"], limit["above_met"], limit["below"], limit["below_met"]) == (
        2,
        2,
        1,
        0,
    )
    assert limit["fastest_miss_req_s"] == 32_000
    assert "38,400 req/s (k median)" in capsys.readouterr().out


def test_no_quiet_rounds_is_an_error(tmp_path: Path) -> None:
    a = _run(tmp_path / "http_bench-a.json", [("fastingest", 32_000, 6.0, 3.0)])
    with pytest.raises(SystemExit, match="no pinned rounds"):
        p99_rate.main(["--out", str(tmp_path / "p99.json"), str(a)])
