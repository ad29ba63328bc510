"""The ingest server end to end: real sockets, the real CLI, moto's S3 over HTTP."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import orjson
import pytest
import zstandard

from support import Server, landed_dir, landed_s3, lines_of, wait_until

# The tests of what a client sees run on each front end; batching and the splitter's
# outcome do not depend on it.
pytestmark = pytest.mark.timeout(120)


def payload(i: int) -> dict:
    return {"id": f"p-{i}", "n": i, "nested": {"ok": True, "list": [1, 2.5, None]}, "note": "é ✓"}


# Each form: (content type, headers, body, the exact bytes that must land per payload).
def forms() -> dict[str, tuple[str, dict[str, str], bytes, list[bytes]]]:
    ps = [payload(i) for i in range(5)]
    compact = [orjson.dumps(p) for p in ps]
    spaced = [json.dumps(p, ensure_ascii=False).encode() for p in ps]  # as a client wrote it
    ndjson = b"\r\n".join(spaced) + b"\n"
    one = json.dumps(payload(99), ensure_ascii=False).encode()
    return {
        "collection": (
            "application/json",
            {},
            orjson.dumps({"version": "1", "token": "t", "data": ps}),
            compact,
        ),
        "array": ("application/json", {}, orjson.dumps(ps), compact),
        "object": ("application/json", {}, one, [one]),
        "object-multiline": (
            "application/json",
            {},
            json.dumps(payload(7), indent=2).encode(),
            [orjson.dumps(payload(7))],
        ),
        "ndjson": ("application/x-ndjson", {}, ndjson, spaced),
        "ndjson-gzip": (
            "application/x-ndjson",
            {"Content-Encoding": "gzip"},
            gzip.compress(ndjson),
            spaced,
        ),
        "array-zstd": (
            "application/json",
            {"Content-Encoding": "zstd"},
            zstandard.ZstdCompressor().compress(orjson.dumps(ps)),
            compact,
        ),
    }


@pytest.mark.parametrize(
    ("mode", "compression"), [("batch", "gzip"), ("batch", "zstd"), ("per-payload", "none")]
)
def test_every_body_form_lands_once_byte_identical(
    tmp_path, s3, bucket, s3_env, mode, compression, front
):
    server = Server(
        "--sink",
        f"s3://{bucket}/events",
        "--mode",
        mode,
        "--compression",
        compression,
        cwd=tmp_path,
        env=s3_env,
        front=front,
    )
    expected: Counter[bytes] = Counter()
    for name, (ctype, headers, body, landed) in forms().items():
        status, _, answer = server.post(body, ctype, **headers)
        assert (status, answer) == (202, {"accepted": len(landed), "ack": "durable"}), name
        expected.update(landed)
    assert server.stop() == 0
    got, objects = landed_s3(s3, bucket)
    assert got == expected
    assert all(o["key"].startswith("events/dt=") for o in objects)
    if mode == "batch":
        suffix = ".ndjson.gz" if compression == "gzip" else ".ndjson.zst"
        assert all("/hour=" in o["key"] and o["key"].endswith(suffix) for o in objects)
    else:
        assert len(objects) == sum(expected.values())
        assert all(o["key"].endswith(".json") for o in objects)
    for o in objects:  # what a downstream job needs to check completeness
        assert int(o["metadata"]["fastingest-payloads"]) == o["count"]
        assert o["metadata"]["fastingest-first"] <= o["metadata"]["fastingest-last"]
        assert o["metadata"]["fastingest-sha256"] == o["sha256"]  # of the object as stored


def test_local_default_sink_and_batch_thresholds(tmp_path):
    # No age threshold within the test: only the payload count may close a batch.
    server = Server("--batch-max-payloads", "3", "--batch-max-age", "300", cwd=tmp_path)
    sent: Counter[bytes] = Counter()
    for i in range(10):
        line = orjson.dumps(payload(i))
        assert server.post(line)[0] == 202
        sent[line] += 1
    for size in (2, 4, 1, 1, 5):  # the threshold counts payloads, not requests
        items = [payload(100 + len(sent) + j) for j in range(size)]
        assert server.post(orjson.dumps(items))[0] == 202
        sent.update(orjson.dumps(item) for item in items)
    assert server.stop() == 0
    root = tmp_path / "fastingest-data" / "objects"
    assert landed_dir(root) == sent
    objects = sorted(root.rglob("*.ndjson.zst"))  # keys name their first chunk: in order
    sizes = [len(lines_of(p.read_bytes(), p.name)) for p in objects]
    assert sizes == [3, 3, 3, 1 + 2, 4, 1 + 1 + 5]  # each closes at the first chunk to reach 3
    assert not list(root.rglob(".*tmp*")), "temporary files left behind"


def test_batch_closes_on_age(tmp_path):

    server = Server("--batch-max-age", "0.3", cwd=tmp_path)
    assert server.post(b'{"a": 1}')[0] == 202
    root = tmp_path / "fastingest-data" / "objects"
    assert wait_until(lambda: any(root.rglob("*.ndjson.zst")), timeout=10), (
        "age threshold never closed the batch"
    )
    assert server.stop() == 0
    assert landed_dir(root) == Counter({b'{"a": 1}': 1})


# --- bad input: precise 4xx, JSON body, and the server keeps serving ---------------

TOKEN = "s3cr3t-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory, front):
    cwd = tmp_path_factory.mktemp("strict")
    args = ["--auth-token", TOKEN, "--auth-token", "other", "--max-body-bytes", "2048"]
    server = Server(*args, cwd=cwd, front=front)
    yield server
    assert server.stop() == 0


BAD = [
    (
        "malformed json",
        "POST",
        "/ingest",
        b'{"a": [1, 2',
        "application/json",
        {},
        400,
        "malformed_json",
    ),
    (
        "malformed ndjson line",
        "POST",
        "/ingest",
        b'{"a":1}\n{"b":\n',
        "application/x-ndjson",
        {},
        400,
        "malformed_json",
    ),
    (
        "payload not an object",
        "POST",
        "/ingest",
        b'[{"a":1}, [2]]',
        "application/json",
        {},
        422,
        "invalid_payload",
    ),
    ("scalar body", "POST", "/ingest", b"42", "application/json", {}, 422, "invalid_payload"),
    (
        "data not a list",
        "POST",
        "/ingest",
        b'{"version":1,"data":{"a":1}}',
        "application/json",
        {},
        422,
        "invalid_collection",
    ),
    ("empty data", "POST", "/ingest", b'{"data":[]}', "application/json", {}, 422, "no_payloads"),
    (
        "integer beyond 64 bits in a payload spanning lines",  # re-serialised: a float
        "POST",
        "/ingest",
        b'{"data":[{"n":\n18446744073709551616}]}',
        "application/json",
        {},
        400,
        "integer_out_of_range",
    ),
    (
        "a payload repeats a member name",
        "POST",
        "/ingest",
        b'{"data":[{"id":1},{"id":2,"id":3}]}',
        "application/json",
        {},
        400,
        "duplicate_key",
    ),
    (
        "an ndjson line repeats a member name",
        "POST",
        "/ingest",
        b'{"a":1}\n{"a":1,"a":2}\n',
        "application/x-ndjson",
        {},
        400,
        "duplicate_key",
    ),
    (
        "a payload too deep to re-serialise",  # orjson writes 254 levels at most
        "POST",
        "/ingest",
        b'[{"a":' + b"[" * 300 + b"]" * 300 + b"}]",
        "application/json",
        {},
        400,
        "too_deep",
    ),
    (
        "ndjson array line",
        "POST",
        "/ingest",
        b'{"a":1}\n[1]\n',
        "application/x-ndjson",
        {},
        422,
        "invalid_payload",
    ),
    (
        "wrong content type",
        "POST",
        "/ingest",
        b'{"a":1}',
        "text/plain",
        {},
        415,
        "unsupported_media_type",
    ),
    ("no content type", "POST", "/ingest", b'{"a":1}', None, {}, 415, "unsupported_media_type"),
    (
        "unknown encoding",
        "POST",
        "/ingest",
        b'{"a":1}',
        "application/json",
        {"Content-Encoding": "br"},
        415,
        "unsupported_encoding",
    ),
    (
        "corrupt gzip",
        "POST",
        "/ingest",
        b"\x1f\x8bnot gzip",
        "application/json",
        {"Content-Encoding": "gzip"},
        400,
        "bad_encoding",
    ),
    ("empty body", "POST", "/ingest", b"", "application/json", {}, 400, "empty_body"),
    (
        "body over limit",
        "POST",
        "/ingest",
        b'{"a":"' + b"x" * 3000 + b'"}',
        "application/json",
        {},
        413,
        "body_too_large",
    ),
    (
        "gzip bomb",
        "POST",
        "/ingest",
        gzip.compress(b'{"a":"' + b"x" * 1_000_000 + b'"}'),
        "application/json",
        {"Content-Encoding": "gzip"},
        413,
        "body_too_large",
    ),
    ("wrong method", "GET", "/ingest", None, None, {}, 405, "method_not_allowed"),
    ("unknown path", "POST", "/nowhere", b"{}", "application/json", {}, 404, "not_found"),
]


@pytest.mark.parametrize(
    ("name", "method", "path", "body", "ctype", "headers", "status", "code"),
    BAD,
    ids=[b[0] for b in BAD],
)
def test_bad_requests_get_a_precise_json_answer(
    strict_server, name, method, path, body, ctype, headers, status, code
):
    hdrs = {**AUTH, **headers}
    if ctype:
        hdrs["Content-Type"] = ctype
    got, resp_headers, answer = strict_server.request(method, path, body, **hdrs)
    assert got == status, answer
    assert resp_headers["content-type"].startswith("application/json")
    assert answer["error"] == code and answer["detail"]
    # ...and the server still serves the next client.
    assert strict_server.post(b'{"after": "' + name.encode() + b'"}', **AUTH)[0] == 202


def test_errors_say_where(strict_server):
    _, _, answer = strict_server.post(b'{"a": 1,\n "b": ]}', **AUTH)
    assert (answer["line"], answer["column"]) == (2, 7)
    _, _, answer = strict_server.post(b'{"data": [{"a":1}, {"b":2}, "three"]}', **AUTH)
    assert answer["index"] == 2 and "data[2]" in answer["detail"]
    _, _, answer = strict_server.post(b'{"a":1}\n\n{"b":2}\n7\n', "application/x-ndjson", **AUTH)
    assert (answer["index"], answer["line"]) == (2, 4)
    _, headers, _ = strict_server.request("GET", "/ingest")
    assert "POST" in headers["allow"]


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({}, b'{"a":1}', 401),
        ({"Authorization": "Bearer wrong"}, b'{"a":1}', 401),
        ({"Authorization": f"Basic {TOKEN}"}, b'{"a":1}', 401),
        ({}, b'{"version":1,"token":"wrong","data":[{"a":1}]}', 401),
        ({}, orjson.dumps({"version": 1, "token": TOKEN, "data": [{"a": 1}]}), 202),
        ({"Authorization": "Bearer other"}, b'{"a":1}', 202),
        (AUTH, b'{"a":1}', 202),
    ],
)
def test_auth(strict_server, headers, body, status):
    got, resp_headers, answer = strict_server.post(body, **headers)
    assert got == status, answer
    if status == 401:
        assert answer["error"] == "unauthorized"
        assert resp_headers["www-authenticate"].startswith("Bearer")


def test_integers_land_as_sent_or_not_at_all(tmp_path):
    server = Server(cwd=tmp_path)
    edge = b'{"max":18446744073709551615,"min":-9223372036854775808,"id":"12345678901234567890123"}'
    big = b'{"n": 123456789012345678901234567890}'
    assert server.post(b'{"data":[\n' + edge.replace(b",", b",\n") + b"]}")[0] == 202
    assert server.post(big)[0] == 202
    assert server.post(b"[" + big + b"]")[0] == 202  # each payload on one line: stored as sent
    assert server.post(b'{"data":[' + big + b"],\n" + b'"token":"t"}')[0] == 202
    # Spanning lines, a payload is re-serialised, and orjson would make this one a float.
    assert server.post(b"[" + big.replace(b" ", b"\n") + b"]")[2]["error"] == "integer_out_of_range"
    assert server.stop() == 0
    landed = landed_dir(tmp_path / "fastingest-data" / "objects")
    assert landed == Counter({edge: 1, big: 3})  # the edge case re-serialised, still exact


def test_repeated_member_names_are_refused_or_with_allow_stored_as_sent(tmp_path):
    twice = b'{"id":2,"id":3}'
    (tmp_path / "strict").mkdir()
    (tmp_path / "allow").mkdir()
    strict = Server(cwd=tmp_path / "strict")
    status, _, answer = strict.post(b'{"data":[{"id":1},' + twice + b"]}")
    assert (status, answer["error"], answer["path"]) == (400, "duplicate_key", "$.data[1]")
    assert strict.post(b'{"id":1}')[0] == 202
    assert strict.stop() == 0
    assert landed_dir(tmp_path / "strict" / "fastingest-data" / "objects") == Counter([b'{"id":1}'])

    allow = Server(cwd=tmp_path / "allow", env={"FASTINGEST_DUPLICATE_KEYS": "allow"})
    assert allow.post(b'{"data":[{"id":1},' + twice + b"]}")[0] == 202
    status, _, answer = allow.post(b'{"version":1,"version":2,"data":[{"id":4}]}')
    assert (status, answer["error"], answer["path"]) == (400, "duplicate_key", "$")
    assert allow.stop() == 0
    landed = landed_dir(tmp_path / "allow" / "fastingest-data" / "objects")
    assert landed == Counter([b'{"id":1}', twice])  # as sent


def test_bad_requests_queue_nothing(tmp_path, front):
    server = Server(cwd=tmp_path, front=front)
    for body in [b'[{"a":1}, 2]', b'{"data":[{"a":1}, null]}', b'[{"a":1}, {"b":']:
        assert server.post(body)[0] in (400, 422)
    assert server.post(b'{"good": true}')[0] == 202
    assert server.stop() == 0
    assert landed_dir(tmp_path / "fastingest-data" / "objects") == Counter({b'{"good": true}': 1})


def test_health_and_readiness(tmp_path, s3, bucket, s3_env, front):
    server = Server("--sink", f"s3://{bucket}", cwd=tmp_path, env=s3_env, front=front)
    assert server.request("GET", "/healthz")[:1] == (200,)
    status, _, answer = server.request("GET", "/readyz")
    assert status == 200 and answer["status"] == "ready"
    assert server.stop() == 0
    # A sink that fails does not make the server unready: the spool holds what it takes.
    args = ["--sink", "s3://no-such-bucket-here", "--batch-max-age", "0.1"]
    missing = Server(*args, cwd=tmp_path, env=s3_env, front=front)
    assert missing.request("GET", "/healthz")[0] == 200
    assert missing.post(b'{"held": 1}')[0] == 202
    assert wait_until(lambda: "DELIVERY STALLED" in missing.text, timeout=20)
    status, _, answer = missing.request("GET", "/readyz")
    assert (status, answer["sink"]) == (200, "failing") and "NoSuchBucket" in answer["sink_error"]
    assert missing.stop() == 0


def test_the_front_end_runs_the_build_it_says(tmp_path, front):
    """The `lean-py` runs are the Python source; `lean` is compiled wherever it was built."""
    from fastingest import lean

    server = Server(cwd=tmp_path, front=front)
    assert server.stop() == 0
    expected = {
        "lean": "lean (compiled)" if lean.COMPILED else "lean (python)",
        "lean-py": "lean (python)",
        "aiohttp": "http aiohttp",
    }[front]
    assert expected in server.text


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_busy_port_is_a_clear_error(tmp_path, processes, front):
    """Never a traceback, and never a second server silently sharing the port (SO_REUSEPORT)."""
    import subprocess
    import sys

    first = Server(cwd=tmp_path, env={"FASTINGEST_PROCESSES": processes}, front=front)
    assert wait_until(lambda: first.text.count("listening on") == int(processes), timeout=30)
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastingest",
            "serve",
            "--processes",
            processes,
            "--listen",
            f"127.0.0.1:{first.port}",
            "--data-dir",
            str(tmp_path / "other"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 78  # EX_CONFIG: what a supervisor does not restart
    assert "cannot listen on" in second.stderr and "Traceback" not in second.stderr
    assert first.stop() == 0
