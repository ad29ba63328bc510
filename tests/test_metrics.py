"""GET /metrics after a known load: the numbers add up, also summed over --processes."""

from __future__ import annotations

import json
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastingest.endpoints import METRICS_TTL
from support import Server, landed_dir, wait_until

pytestmark = pytest.mark.timeout(120)


_SCRAPED: dict[int, float] = {}  # port -> when it was last scraped


def scrape(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of a fresh render: the server serves one page for METRICS_TTL."""
    wait = _SCRAPED.get(server.port, 0.0) + METRICS_TTL - time.monotonic()
    if wait > 0:
        time.sleep(wait)
    status, headers, body = server.request("GET", "/metrics")
    _SCRAPED[server.port] = time.monotonic()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_add_up_after_a_known_load(tmp_path, front):
    server = Server("--batch-max-age", "0.2", cwd=tmp_path, front=front)
    good = [b'[{"a":1},{"b":2},{"c":3}]'] * 10
    sent = 0
    for body in good:
        assert server.post(body)[0] == 202
        sent += len(body)
    for body in (b'{"a":', b"[1"):
        assert server.post(body)[0] == 400
        sent += len(body)
    assert server.post(b"[1]")[0] == 422
    sent += 3
    assert server.request("GET", "/nowhere")[0] == 404
    assert wait_until(lambda: value(scrape(server), "fastingest_payloads_uploaded_total") == 30)
    m = scrape(server)
    assert value(m, "fastingest_requests_total", route="/ingest", status="202") == 10
    assert value(m, "fastingest_requests_total", route="/ingest", status="400") == 2
    assert value(m, "fastingest_requests_total", route="/ingest", status="422") == 1
    assert value(m, "fastingest_requests_total", route="unmatched", status="404") == 1
    assert value(m, "fastingest_request_errors_total", error="malformed_json") == 2
    assert value(m, "fastingest_request_errors_total", error="invalid_payload") == 1
    assert value(m, "fastingest_bytes_in_total") == sent
    accepted = value(m, "fastingest_payloads_accepted_total")
    assert accepted == value(m, "fastingest_payloads_durable_total") == 30
    # Reconciliation: accepted + replayed == uploaded + dead-lettered + held.
    assert accepted + value(m, "fastingest_payloads_replayed_total") == (
        value(m, "fastingest_payloads_uploaded_total")
        + value(m, "fastingest_payloads_dead_lettered_total")
        + value(m, "fastingest_payloads_held")
    )
    objects = value(m, "fastingest_objects_uploaded_total")
    assert objects >= 1 and value(m, "fastingest_upload_seconds_count") == objects
    assert value(m, "fastingest_bytes_out_total") > 0
    assert value(m, "fastingest_queue_requests") == value(m, "fastingest_queue_payloads") == 0
    assert value(m, "fastingest_batches_closed_total") == objects
    assert value(m, "fastingest_payloads_held") == 0
    assert server.stop() == 0


def test_received_payloads_wait_for_the_next_fsync_someone_asks_for(tmp_path):
    # No batch closes (its marker would fsync the segment): only the requests decide.
    server = Server("--batch-max-age", "60", cwd=tmp_path)
    for i in range(5):
        assert server.post(b'{"r":%d}' % i, **{"X-Fastingest-Ack": "received"})[0] == 202
    assert wait_until(lambda: value(scrape(server), "fastingest_payloads_accepted_total") == 5)
    time.sleep(0.3)  # time enough for an fsync nobody asked for, were there one
    assert value(scrape(server), "fastingest_payloads_durable_total") == 0
    assert server.post(b'{"d":1}', **{"X-Fastingest-Ack": "durable"})[0] == 202
    assert value(scrape(server), "fastingest_payloads_durable_total") == 6  # one fsync, all six
    assert server.stop() == 0
    assert sum(landed_dir(tmp_path / "fastingest-data" / "objects").values()) == 6


def test_metrics_sum_over_worker_processes(tmp_path):
    server = Server("--batch-max-age", "0.2", cwd=tmp_path, env={"FASTINGEST_PROCESSES": "2"})
    assert wait_until(lambda: server.text.count("listening on") == 2, timeout=30)
    for i in range(40):  # a fresh connection each: the kernel spreads them over both workers
        assert server.post(b'{"i":%d}' % i)[0] == 202
    assert wait_until(lambda: value(scrape(server), "fastingest_payloads_uploaded_total") == 40)
    for _ in range(6):  # whichever worker answers, it reports both
        m = scrape(server)
        assert value(m, "fastingest_payloads_accepted_total") == 40
        assert value(m, "fastingest_requests_total", route="/ingest", status="202") == 40
    assert server.stop() == 0
    served = [line for line in server.log if "stopped: accepted" in line]
    assert len(served) == 2 and all("accepted 0 " not in line for line in served)
    # Each worker's JSON log lines say which worker it is.
    assert sorted(json.loads(line)["worker"] for line in served) == [0, 1]


def test_json_logs_never_carry_payloads_or_tokens(tmp_path, front):
    import json

    secret, marker = "tok-9f8e7d", "PAYLOAD-CONTENT-7731"
    server = Server(
        "--auth-token",
        secret,
        "--log-format",
        "json",
        "--sink",
        "s3://nowhere",
        "--batch-max-age",
        "0.1",
        cwd=tmp_path,
        front=front,
        env={
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
            "AWS_ACCESS_KEY_ID": "x",
            "AWS_SECRET_ACCESS_KEY": "x",
            "AWS_REGION": "us-east-1",
        },
    )
    auth = {"Authorization": f"Bearer {secret}"}
    assert server.post(b'{"note":"%s"}' % marker.encode(), **auth)[0] == 202
    assert server.post(b'{"note":"%s", broken' % marker.encode(), **auth)[0] == 400
    assert (
        server.post(b'{"note":"%s"}' % marker.encode(), Authorization="Bearer " + secret + "x")[0]
        == 401
    )
    assert wait_until(lambda: "DELIVERY STALLED" in server.text, timeout=20)
    assert server.stop() == 0  # the upload fails: the object stays in the spool, logged
    lines = [json.loads(line) for line in server.log]
    assert {"time", "level", "logger", "message", "pid"} <= set(lines[0])
    assert any(e["level"] == "error" and "DELIVERY STALLED" in e["message"] for e in lines)
    assert marker not in server.text and secret not in server.text


def test_readiness_fails_as_soon_as_draining_starts(tmp_path):
    import signal

    server = Server("--drain-delay", "1.5", cwd=tmp_path)
    assert server.request("GET", "/readyz")[0] == 200
    server.proc.send_signal(signal.SIGTERM)
    assert wait_until(lambda: "draining: not ready" in server.text, timeout=10)
    status, _, answer = server.request("GET", "/readyz")
    assert (status, answer["error"]) == (503, "draining")
    assert server.post(b'{"late": true}')[0] == 202  # still served during the delay
    assert server.stop() == 0
