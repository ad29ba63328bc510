"""The spool is the buffer: sink outages, full disks, crashes and a dead supervisor.

Each test counts what was acknowledged and reads back what landed: each acknowledged
payload exactly once, nothing that a client was refused, nothing left only in the
dead-letter directory after an outage the store recovers from. None of these depend on
the HTTP front end, so they run on the default one only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from support import S3Proxy, Server, dead_lettered, landed_dir, landed_s3, load, wait_until
from test_durability import assert_exactly_once
from test_metrics import scrape, value

pytestmark = pytest.mark.timeout(240)


def ready(server: Server) -> tuple[int, dict]:
    status, _, answer = server.request("GET", "/readyz")
    return status, answer


@pytest.mark.slow
@pytest.mark.parametrize(
    ("failure", "outage", "store"),
    [
        ("down", 30.0, "moto"),
        ("blackhole", 8.0, "moto"),
        ("5xx", 8.0, "moto"),
        ("delay", 8.0, "moto"),
        ("down", 8.0, "seaweedfs"),  # signatures and If-None-Match checked by the store
    ],
    indirect=["store"],
)
def test_an_outage_under_load_is_ridden_out_in_the_spool(tmp_path, store, failure, outage):
    """Default settings. The store goes away under load and comes back: no client sees a
    503, /readyz stays 200, the stall and the recovery are logged once each, and every
    acknowledged payload lands once, with nothing dead-lettered."""
    bucket = store.bucket()
    proxy = S3Proxy(store.env["AWS_ENDPOINT_URL"])
    server = Server(
        "--sink", f"s3://{bucket}", cwd=tmp_path, env={**store.env, "AWS_ENDPOINT_URL": proxy.url}
    )
    acked: list[bytes] = []
    statuses: Counter[int] = Counter()
    asyncio.run(
        load(server.port, tag="before", seconds=1, acked=acked, statuses=statuses, clients=4)
    )
    proxy.mode = failure
    readiness: list[int] = []

    async def outage_load() -> None:
        async def probe() -> None:
            deadline = time.monotonic() + outage
            while time.monotonic() < deadline:
                readiness.append(await asyncio.to_thread(lambda: ready(server)[0]))
                await asyncio.sleep(1)

        await asyncio.gather(
            load(
                server.port, tag="during", seconds=outage, acked=acked, statuses=statuses, clients=4
            ),
            probe(),
        )

    asyncio.run(outage_load())
    # A black hole is only slow until the client's 30 s read timeout: no stall yet, but the
    # closed batches wait on disk all the same. A slow store is no failure at all: each
    # object waits for its PUT's delay only, so the oldest may be younger than a second.
    noticed = failure in ("down", "5xx")
    m = scrape(server)
    if failure == "delay":
        assert proxy.counts["delayed"] > 0
    else:
        assert value(m, "fastingest_unstored_oldest_seconds") >= 1
    assert value(m, "fastingest_spool_bytes") > 0
    if noticed:
        assert "DELIVERY STALLED" in server.text, "the stall was never noticed"
        assert value(m, "fastingest_sink_up") == 0
    proxy.mode = "pass"
    if noticed:
        assert wait_until(lambda: "delivery resumed" in server.text, timeout=60)
    asyncio.run(
        load(server.port, tag="after", seconds=1, acked=acked, statuses=statuses, clients=4)
    )

    def landed() -> Counter[bytes]:
        return landed_s3(store.client, bucket)[0]

    assert wait_until(lambda: sum(landed().values()) >= len(acked), timeout=90)
    m = scrape(server)
    assert value(m, "fastingest_sink_up") == 1
    assert server.stop() == 0
    proxy.close()
    assert statuses[503] == 0 and statuses[202] > 0, statuses
    assert set(readiness) == {200}, readiness
    assert server.text.count("DELIVERY STALLED") == server.text.count("delivery resumed") == noticed
    assert "dead-lettered 0" in server.text
    assert_exactly_once(landed(), acked)
    assert not (tmp_path / "fastingest-data" / "dead-letter").exists()


def test_a_failed_dead_letter_write_keeps_the_spool_copy_until_redrive(
    tmp_path, s3, bucket, s3_env, moto_endpoint
):
    """The store refuses every object and the dead-letter directory cannot be written: the
    payloads stay in the spool, through a kill -9, until the directory is writable; then
    `fastingest redrive` lands them under their keys, with their metadata."""
    proxy = S3Proxy(moto_endpoint)
    proxy.refuse = lambda headers: (400, "InvalidArgument")
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the dead-letter directory's parent should be")
    dead_dir = blocker / "dead-letter"
    args = [
        "--sink",
        f"s3://{bucket}",
        "--dead-letter-dir",
        str(dead_dir),
        "--batch-max-age",
        "0.2",
    ]
    env = {**s3_env, "AWS_ENDPOINT_URL": proxy.url}
    server = Server(*args, "--retry-base-delay", "0.05", cwd=tmp_path, env=env)
    acked = [b'{"id":"dl-%d"}' % i for i in range(20)]
    for payload in acked:
        assert server.post(payload)[0] == 202
    assert wait_until(lambda: "cannot dead-letter" in server.text, timeout=20)
    server.stop(signal.SIGKILL)
    assert "LOST" not in server.text
    blocker.unlink()  # the operator frees the directory
    again = Server(*args, cwd=tmp_path, env=env)
    assert wait_until(lambda: sum(dead_lettered(dead_dir)[0].values()) == len(acked), timeout=30)
    assert again.stop() == 0
    got, errors = dead_lettered(dead_dir)
    assert_exactly_once(got, acked)
    assert all("InvalidArgument" in e["error"] for e in errors)
    keys = sorted(e["key"] for e in errors)

    proxy.refuse = None  # the store takes them now
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTINGEST_")}
    redrive = subprocess.run(
        [sys.executable, "-m", "fastingest", "redrive", *args],
        cwd=tmp_path,
        env={**env, **s3_env, "AWS_ENDPOINT_URL": proxy.url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    proxy.close()
    assert redrive.returncode == 0, redrive.stderr
    assert f"redrive: {len(keys)} objects stored" in redrive.stderr
    got, objects = landed_s3(s3, bucket)
    assert_exactly_once(got, acked)
    assert sorted(o["key"] for o in objects) == keys
    assert all(o["metadata"]["fastingest-payloads"] == str(o["count"]) for o in objects)
    assert all(o["metadata"]["fastingest-sha256"] == o["sha256"] for o in objects)
    assert [p for p in dead_dir.rglob("*") if p.is_file()] == []


def _small_files() -> None:
    # A file-size cap stands in for a disk that fills up: writes past it fail with EFBIG.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (48 * 1024, 48 * 1024))


def test_refused_requests_are_never_delivered_and_acknowledged_ones_survive_a_crash(
    tmp_path, s3, bucket, s3_env
):
    """Spool writes fail now and then under load: requests answered 503 are taken out of
    the queue (never delivered), acknowledged ones land once, across a kill -9."""
    args = ["--sink", f"s3://{bucket}", "--batch-max-payloads", "200", "--batch-max-age", "0.3"]
    server = Server(*args, cwd=tmp_path, env=s3_env, preexec_fn=_small_files)
    acked: list[bytes] = []
    refused: list[bytes] = []

    async def run() -> None:
        url = f"http://127.0.0.1:{server.port}/ingest"
        counter = iter(range(10**9))

        async def client(session: aiohttp.ClientSession) -> None:
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                batch = [b'{"id":"c-%d","pad":"%s"}' % (next(counter), b"x" * 60) for _ in range(5)]
                body = b'{"version":1,"data":[' + b",".join(batch) + b"]}"
                try:
                    async with session.post(
                        url, data=body, headers={"Content-Type": "application/json"}
                    ) as r:
                        answer = await r.json()
                        if r.status == 202:
                            acked.extend(batch)
                        elif answer.get("error") == "spool_unavailable":
                            refused.extend(batch)
                except (TimeoutError, aiohttp.ClientError):
                    return

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            task = asyncio.gather(*(client(session) for _ in range(8)))
            await asyncio.sleep(3)
            server.proc.kill()
            await task

    asyncio.run(run())
    server.proc.wait(10)
    assert "SPOOL WRITE FAILED" in server.text
    assert refused and acked, (len(refused), len(acked))
    final = Server(*args, cwd=tmp_path, env=s3_env)
    assert final.stop() == 0
    got, _ = landed_s3(s3, bucket)
    assert_exactly_once(got, acked)
    assert not got & Counter(refused), "a payload answered 503 was delivered"


def test_a_newer_segment_waits_for_the_older_ones(tmp_path):
    """A batch spans two segments and its marker is in the newer: that one may not go first,
    or a crash would leave the batch's first chunks without their marker (and send them again)."""
    from fastingest.spool import Spool
    from fastingest.spool_records import BATCH, DATA, Marker

    async def main() -> None:
        spool = Spool(tmp_path, 1 << 30, segment_bytes=400)
        spool.open()
        for seq in range(5):
            await spool.wait(spool.append(DATA, seq, 0.0, b'{"a":%d,"pad":"xxxxxxxxxx"}\n' % seq))
        y = Marker(0, 4, "y", "none", 0.0)
        await spool.wait(spool.append_marker(y))
        for seq in range(5, 15):
            await spool.wait(spool.append(DATA, seq, 0.0, b'{"a":%d,"pad":"xxxxxxxxxx"}\n' % seq))
        x = Marker(5, 14, "x", "none", 0.0)
        await spool.wait(spool.append_marker(x))
        await spool.wait(spool.append(DATA, 15, 0.0, b"{}\n"))
        assert len(spool.segments) >= 3
        spool.stored(range(5, 15), marker=5)  # batch x stored; batch y not yet
        await spool.unlinked()
        # Crash here: what a restart finds must still hold x's marker beside its chunks.
        os.close(spool._file)
        os.close(spool._lock_fd)
        spool._syncer.stop()

    asyncio.run(main())
    records = Spool(tmp_path, 1 << 30).open()
    markers = {r.batch.key for r in records if r.kind == BATCH}
    data = {r.seq for r in records if r.kind == DATA}
    assert "x" in markers and set(range(5, 10)) <= data


def test_the_spool_gives_space_back_below_one_segment(tmp_path):
    """A 512 KiB spool with a sink that keeps up takes 3 MiB: its segments are sized from
    the bound and freed as soon as they are stored, so a 503 (the spool full for a moment
    under a slow host) passes, where segments that are never freed would refuse for ever.
    Once idle, the spool gives everything back."""
    server = Server("--spool-max-bytes", "512K", "--batch-max-age", "0.05", cwd=tmp_path)
    payload = b'{"pad":"%s","n":%%d}' % (b"y" * 1000)
    deadline = time.monotonic() + 90
    refused = 0
    for i in range(3000):
        while (status := server.post(payload % i)[0]) == 503 and time.monotonic() < deadline:
            refused += 1
            time.sleep(0.05)
        assert status == 202, f"payload {i} refused for good after {refused} 503s"
    spool = tmp_path / "fastingest-data" / "spool" / "0"

    def size() -> int:
        return sum(p.stat().st_size for p in spool.glob("seg-*.log"))

    assert wait_until(lambda: size() <= 64, timeout=20), size()
    assert server.stop() == 0
    assert sum(landed_dir(tmp_path / "fastingest-data" / "objects").values()) == 3000


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs for the spool (root only: mount(2))."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        if os.environ.get("FASTINGEST_REQUIRE_ROOT_TESTS") == "1":
            pytest.fail(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
        pytest.skip("needs root to mount a small filesystem")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    ballast = disk / "ballast"
    with open(ballast, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    return ballast


def test_a_full_disk_is_refused_then_recovered_from_without_a_restart(tmp_path, small_disk):
    spool = small_disk / "spool"
    full_start = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastingest",
            "serve",
            "--processes",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--spool-dir",
            str(spool),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("FASTINGEST_")},
        preexec_fn=lambda: fill(small_disk) and None,
    )
    assert full_start.returncode == 78
    assert "No space left on device" in full_start.stderr
    said = [ln for ln in full_start.stderr.splitlines() if "no --auth-token" not in ln]
    assert "Traceback" not in full_start.stderr and len(said) == 1, said
    (small_disk / "ballast").unlink()

    server = Server("--spool-dir", str(spool), "--batch-max-age", "0.1", cwd=tmp_path)
    acked = [b'{"id":"early-%d"}' % i for i in range(10)]
    for payload in acked:
        assert server.post(payload)[0] == 202
    ballast = fill(small_disk)
    statuses = Counter(
        server.post(b'{"id":"late-%d","pad":"%s"}' % (i, b"z" * 2000))[0] for i in range(50)
    )
    assert statuses[503] > 0, statuses
    status, answer = ready(server)
    assert (status, answer.get("error")) == (503, "spool_full")
    ballast.unlink()  # space again: taken without a restart
    time.sleep(1.1)  # the spool retries its disk after a failed write's backoff
    assert wait_until(lambda: server.post(b'{"id":"after"}')[0] == 202, timeout=10)
    acked.append(b'{"id":"after"}')
    assert ready(server)[0] == 200
    assert server.stop() == 0
    got = landed_dir(tmp_path / "fastingest-data" / "objects")
    assert_exactly_once(got, acked)


def test_workers_die_with_a_killed_supervisor(tmp_path):
    server = Server(cwd=tmp_path, env={"FASTINGEST_PROCESSES": "2"})
    assert wait_until(lambda: server.text.count("listening on") == 2, timeout=30)
    pids = [int(p) for p in re.findall(r"worker \d started \(pid (\d+)\)", server.text)]
    assert len(pids) == 2
    assert server.post(b'{"id":"before"}')[0] == 202
    server.proc.kill()  # kill -9 of the supervisor
    server.proc.wait(10)  # reaped, as its own parent would

    def gone() -> bool:
        alive = 0
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, 0)
                alive += not Path(f"/proc/{pid}/status").read_text().count("zombie")
        return alive == 0

    assert wait_until(gone, timeout=40), "a worker outlived its supervisor"
    leftover = f"fastingest-metrics-{server.proc.pid}-*"
    again = Server(
        "--listen", f"127.0.0.1:{server.port}", cwd=tmp_path, env={"FASTINGEST_PROCESSES": "2"}
    )
    assert wait_until(lambda: again.text.count("listening on") == 2, timeout=30)
    assert not list(Path(tempfile.gettempdir()).glob(leftover)), "the dead one's metrics dir"
    assert again.stop() == 0
    assert landed_dir(tmp_path / "fastingest-data" / "objects") == Counter([b'{"id":"before"}'])


@pytest.mark.parametrize("processes", ["1", "2"])
@pytest.mark.parametrize(
    ("args", "rc", "said"),
    [
        (["--listen", "127.0.0.1:99999"], 2, "port must be 0-65535"),
        (["--sink", "ftp://somewhere/x"], 78, "unsupported sink 'ftp://somewhere/x'"),
    ],
)
def test_bad_settings_are_one_clear_line_before_anything_starts(
    tmp_path, processes, args, rc, said
):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTINGEST_")}
    done = subprocess.run(
        [sys.executable, "-m", "fastingest", "serve", "--processes", processes, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == rc
    assert said in done.stderr and "Traceback" not in done.stderr
    assert "started" not in done.stderr  # no worker was ever spawned


def test_an_object_found_stored_on_replay_is_logged_and_counted(tmp_path):
    """A crash between an upload and the spool's bookkeeping: the replay finds the object
    under its key, says so, and counts it (the sink is not written twice)."""
    from fastingest.batching import EXTENSIONS, KeyMaker
    from fastingest.spool import Spool
    from fastingest.spool_records import DATA, Marker

    spool_dir = tmp_path / "fastingest-data" / "spool" / "0"
    objects = tmp_path / "fastingest-data" / "objects"

    async def crashed_run() -> str:
        spool = Spool(spool_dir, 1 << 30)
        spool.open()
        key = KeyMaker("", spool.id, spool.epoch).batch(1700000000.0, 0, 0, EXTENSIONS["zstd"])
        spool.append(DATA, 0, 1700000000.0, b'{"id":"once"}\n', 1)
        ticket = spool.append_marker(Marker(0, 0, key, "zstd", 1700000000.0))
        await spool.wait(ticket)
        os.close(spool._file)
        os.close(spool._lock_fd)
        spool._syncer.stop()
        return key

    key = asyncio.run(crashed_run())
    (objects / key).parent.mkdir(parents=True)
    import zstandard

    (objects / key).write_bytes(zstandard.ZstdCompressor().compress(b'{"id":"once"}\n'))
    server = Server(cwd=tmp_path)
    assert wait_until(lambda: "already in the sink" in server.text, timeout=20)
    assert value(scrape(server), "fastingest_objects_already_stored_total") == 1
    assert server.stop() == 0
    assert landed_dir(objects) == Counter([b'{"id":"once"}'])
    assert not list(spool_dir.glob("seg-*.log"))
    shutil.rmtree(objects)
