"""--processes: workers on one port, signals forwarded, a dead worker restarted, nothing lost."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections import Counter

import pytest

from support import Server, landed_s3, load, wait_until

pytestmark = pytest.mark.timeout(180)


def start(tmp_path, bucket, s3_env) -> Server:
    server = Server(
        "--sink",
        f"s3://{bucket}",
        "--batch-max-payloads",
        "500",
        cwd=tmp_path,
        env={**s3_env, "FASTINGEST_PROCESSES": "2"},
    )
    assert wait_until(
        lambda: "worker 1 listening" in server.text and "worker 0 listening" in server.text,
        timeout=30,
    ), server.text
    return server


def worker_pids(server: Server) -> dict[int, int]:
    return {
        int(i): int(p) for i, p in re.findall(r"worker (\d+) started \(pid (\d+)\)", server.text)
    }


def check(s3, bucket, acked: list[bytes]) -> None:
    got, objects = landed_s3(s3, bucket)
    assert all(n == 1 for n in got.values()), "a payload landed twice"
    assert not Counter(acked) - got, "acknowledged payloads were lost"
    keys = [o["key"] for o in objects]
    assert len(keys) == len(set(keys))


def test_two_workers_share_the_port_and_drain_on_sigterm(tmp_path, s3, bucket, s3_env):
    server = start(tmp_path, bucket, s3_env)
    acked: list[bytes] = []
    statuses: Counter[int] = Counter()
    asyncio.run(load(server.port, tag="mp", seconds=1.5, acked=acked, statuses=statuses))
    assert server.stop() == 0
    accepted = [int(n) for n in re.findall(r"stopped: accepted (\d+) payloads", server.text)]
    assert len(accepted) == 2 and all(accepted), "both workers should have taken traffic"
    assert "drained and exited with 0" in server.text
    check(s3, bucket, acked)
    spools = tmp_path / "fastingest-data" / "spool"
    assert sorted(p.name for p in spools.iterdir()) == ["0", "1"]


def test_a_killed_worker_is_restarted_and_its_spool_replayed(tmp_path, s3, bucket, s3_env):
    server = start(tmp_path, bucket, s3_env)
    victim = worker_pids(server)[0]
    acked: list[bytes] = []
    statuses: Counter[int] = Counter()

    async def scenario() -> None:
        task = asyncio.ensure_future(
            load(
                server.port,
                tag="k",
                seconds=3,
                acked=acked,
                statuses=statuses,
                headers={"X-Fastingest-Ack": "durable"},
            )
        )
        await asyncio.sleep(0.8)
        os.kill(victim, signal.SIGKILL)
        await task

    asyncio.run(scenario())
    assert wait_until(lambda: "died with signal SIGKILL; restarting" in server.text, timeout=10)
    assert wait_until(
        lambda: len(worker_pids(server)) == 2 and server.text.count("worker 0 listening") == 2,
        timeout=30,
    ), server.text
    assert server.stop() == 0
    assert statuses[202] > 0
    check(s3, bucket, acked)


def test_a_worker_that_cannot_start_stops_the_supervisor_instead_of_looping(tmp_path):
    import fcntl
    import os
    import subprocess
    import sys

    spool = tmp_path / "fastingest-data" / "spool" / "1"
    spool.mkdir(parents=True)
    with open(spool / "LOCK", "w") as lock:  # another process holds worker 1's spool
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("4242\n")
        lock.flush()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FASTINGEST_")}
        done = subprocess.run(
            [sys.executable, "-m", "fastingest", "serve", "--processes", "2", "--listen", ":0"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    # Said once, naming the holder, and not restarted: a worker that says why it cannot
    # start exits with EX_CONFIG, which no restart can mend.
    assert done.stderr.count("is in use by another process (pid 4242)") == 1
    assert "worker 1 cannot start: stopping every worker" in done.stderr
    assert "Traceback" not in done.stderr
