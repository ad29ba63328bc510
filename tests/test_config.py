"""Options, environment twins and precedence."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastingest.cli import build_parser
from fastingest.config import OPTIONS, Settings, resolve
from support import Server


def settings(argv: list[str], env: dict[str, str] | None = None) -> Settings:
    return resolve(build_parser().parse_args(["serve", *argv]), env or {})


def test_defaults():
    s = settings([])
    assert s.listen == ("127.0.0.1", 8000)
    assert s.mode == "batch" and s.compression == "zstd"
    assert s.sink_url.startswith("file://") and s.sink_url.endswith("/fastingest-data/objects")
    assert s.dead_letter_path == Path("fastingest-data/dead-letter")


def test_environment_twins_and_the_original_names():
    env = {
        "FASTINGEST_LISTEN": "0.0.0.0:9000",
        "MAX_WORKERS": "7",
        "MAX_QUEUE": "123",
        "FASTINGEST_MAX_QUEUE_BYTES": "2M",
        "FASTINGEST_MODE": "per-payload",
        "FASTINGEST_AUTH_TOKENS": "a, b,,c",
        "FASTINGEST_BATCH_MAX_AGE": "0.5",
    }
    s = settings([], env)
    assert s.listen == ("0.0.0.0", 9000)
    assert (s.max_workers, s.max_queue, s.max_queue_bytes) == (7, 123, 2 << 20)
    assert s.mode == "per-payload" and s.batch_max_age == 0.5
    assert s.tokens() == ["a", "b", "c"]


def test_fastingest_name_beats_the_alias_and_the_flag_beats_both():
    env = {"FASTINGEST_MAX_WORKERS": "3", "MAX_WORKERS": "9"}
    assert settings([], env).max_workers == 3
    assert settings(["--max-workers", "5"], env).max_workers == 5


def test_token_file(tmp_path):
    f = tmp_path / "tokens"
    f.write_text("# comment\none\n\n two \n")
    s = settings(["--auth-token-file", str(f), "--auth-token", "zero"])
    assert s.tokens() == ["zero", "one", "two"]


@pytest.mark.parametrize(
    "env",
    [
        {"MAX_WORKERS": "0"},
        {"FASTINGEST_MODE": "sideways"},
        {"FASTINGEST_LISTEN": "nope"},
        {"FASTINGEST_MAX_QUEUE_BYTES": "lots"},
    ],
)
def test_bad_environment_values_stop_with_a_clear_message(env):
    with pytest.raises(SystemExit, match=next(iter(env))):
        settings([], env)


@pytest.mark.parametrize("argv", [["--max-workers", "-1"], ["--mode", "x"], ["--listen", "8000"]])
def test_bad_flags_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        settings(argv)
    assert exc.value.code == 2


def test_help_documents_every_option_with_its_env_twin():
    out = subprocess.run(
        [sys.executable, "-m", "fastingest", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    flat = " ".join(out.split())
    for opt in OPTIONS:
        assert opt.flag in out
        assert f"${opt.env[0]}" in flat.replace("$ ", "$")
    version = subprocess.run(
        [sys.executable, "-m", "fastingest", "--version"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert version.startswith("fastingest ")


@pytest.mark.parametrize(
    "source",
    [["--auth-token", ""], ["--auth-token-file", "comments.txt"], ["--auth-token-file", "nowhere"]],
)
def test_an_empty_token_source_is_a_start_up_error(tmp_path, source):
    (tmp_path / "comments.txt").write_text("# the token goes here\n\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTINGEST_")}
    done = subprocess.run(
        [sys.executable, "-m", "fastingest", "serve", "--processes", "1", *source],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 78, done.stderr
    assert "token" in done.stderr and "Traceback" not in done.stderr


def test_running_without_auth_is_said_once_at_start(tmp_path):
    server = Server(cwd=tmp_path)
    assert server.stop() == 0
    assert server.text.count("no --auth-token") == 1
