"""``--processes N``: N server processes on one port (SO_REUSEPORT), supervised.

The parent reserves the port (so ``:0`` works), starts N children running
``fastingest serve`` with ``--processes 1`` on it, each with its own queue,
workers, batches and spool (``<spool-dir>/<index>``), forwards SIGTERM/SIGINT,
restarts a child that dies (its replacement replays the same spool), and exits
only after every child has drained. A child gets SIGTERM (and drains) when the
supervisor dies, so a ``kill -9`` of the supervisor leaves no worker behind.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from fastingest.config import WORKER_INDEX_ENV

log = logging.getLogger("fastingest.supervisor")

RESTART_BACKOFF = 1.0  # seconds before restarting a child that died young
YOUNG = 5.0  # a child that dies sooner than this is restarted after RESTART_BACKOFF
GIVE_UP_AFTER = 5  # consecutive young deaths of one worker: it cannot start, stop everything
PR_SET_PDEATHSIG = 1  # linux/prctl.h
METRICS_DIR_PREFIX = "fastingest-metrics-"
EX_CONFIG = 78  # sysexits.h: a worker's exit code when its settings or environment stop it


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (never listen) a SO_REUSEPORT socket: it fixes the port and joins no accept queue.

    A plain bind first: SO_REUSEPORT alone would let a second fastingest share a port
    that is already serving, and split its traffic without a word.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise SystemExit(
                f"fastingest: cannot listen on {host}:{port}: {exc.strerror}"
            ) from None
        port = probe.getsockname()[1]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class Supervisor:
    def __init__(self, argv: Sequence[str], processes: int, host: str, port: int) -> None:
        self.argv = list(argv)
        self.processes = processes
        self.host = host
        self.port = port
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.started: dict[int, float] = {}
        self.young_deaths: dict[int, int] = {}
        self.stopping = False
        # Shared by the workers so any of them can answer /metrics for all (see metrics.py).
        self.metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or ""
        self._own_metrics_dir = not self.metrics_dir

    def _spawn(self, index: int) -> None:
        # Later flags win in argparse: the child serves alone, on the reserved port.
        host = f"[{self.host}]" if ":" in self.host else self.host
        cmd = [
            sys.executable,
            "-m",
            "fastingest",
            "serve",
            *self.argv,
            "--listen",
            f"{host}:{self.port}",
            "--processes",
            "1",
        ]
        env = {
            **os.environ,
            WORKER_INDEX_ENV: str(index),
            "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir,
        }
        self.children[index] = subprocess.Popen(
            cmd, env=env, preexec_fn=functools.partial(_in_child, os.getpid())
        )
        self.started[index] = time.monotonic()
        log.info("worker %d started (pid %d)", index, self.children[index].pid)

    def run(self) -> int:
        watched = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
        signal.pthread_sigmask(signal.SIG_BLOCK, watched)
        if self._own_metrics_dir:
            _remove_orphaned_metrics_dirs()
            self.metrics_dir = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")
        reserved = reserve_port(self.host, self.port)
        self.port = reserved.getsockname()[1]
        log.info("supervising %d worker processes on %s:%d", self.processes, self.host, self.port)
        for i in range(self.processes):
            self._spawn(i)
        failed = False
        while self.children:
            info = signal.sigtimedwait(watched, 1.0)
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                if not self.stopping:
                    log.info("%s: asking every worker to drain", signal.Signals(info.si_signo).name)
                self.stopping = True
                for child in self.children.values():
                    child.send_signal(info.si_signo)
            for index, child in list(self.children.items()):
                rc = child.poll()
                if rc is None:
                    continue
                del self.children[index]
                _forget_live_gauges(child.pid, self.metrics_dir)
                if self.stopping:
                    failed |= rc != 0
                    log.info("worker %d (pid %d) drained and exited with %d", index, child.pid, rc)
                    continue
                young = time.monotonic() - self.started[index] < YOUNG
                self.young_deaths[index] = self.young_deaths.get(index, 0) + 1 if young else 0
                if rc == EX_CONFIG:  # it said why; restarting cannot help
                    log.error("worker %d cannot start: stopping every worker", index)
                    failed = self.stopping = True
                    for other in self.children.values():
                        other.send_signal(signal.SIGTERM)
                    continue
                if self.young_deaths[index] >= GIVE_UP_AFTER:
                    log.error(
                        "worker %d died %d times right after starting (last: %s); "
                        "not restarting it: stopping every worker",
                        index,
                        GIVE_UP_AFTER,
                        _describe(rc),
                    )
                    failed = self.stopping = True
                    for other in self.children.values():
                        other.send_signal(signal.SIGTERM)
                    continue
                log.error(
                    "worker %d (pid %d) died with %s; restarting it",
                    index,
                    child.pid,
                    _describe(rc),
                )
                if young:
                    time.sleep(RESTART_BACKOFF)
                self._spawn(index)
        reserved.close()
        if self._own_metrics_dir:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        return 1 if failed else 0


def _forget_live_gauges(pid: int, directory: str) -> None:
    """A dead worker's queue and spool gauges no longer count; its counters still do."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, directory)


def _in_child(supervisor: int) -> None:
    """Before a worker runs: its signals unblocked, and it drains when the supervisor dies."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD})
    _die_with_parent()
    if os.getppid() != supervisor:  # it died before the line above took effect
        os._exit(1)


def _die_with_parent() -> None:
    """SIGTERM this process when its parent dies (Linux; elsewhere nothing)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _remove_orphaned_metrics_dirs() -> None:
    """Metrics directories of supervisors that died without cleaning up (kill -9)."""
    for path in Path(tempfile.gettempdir()).glob(f"{METRICS_DIR_PREFIX}*-*"):
        pid = path.name.removeprefix(METRICS_DIR_PREFIX).partition("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(rc: int) -> str:
    return f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
