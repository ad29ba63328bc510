"""The wheel carries the compiled core, and an installed fastingest uses it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

import fastingest

ROOT = Path(__file__).resolve().parents[1]


def test_selector_uses_the_compiled_core_when_built():
    if os.environ.get("FASTINGEST_NO_EXTENSIONS") == "1":
        assert fastingest.RingQueue.__module__ == "fastingest._queue_py"
        return
    try:
        import fastingest._queue as compiled
    except ImportError:
        pytest.skip("extension not built (pure-Python install)")
    from fastingest import _columns as columns_c
    from fastingest import _lean as lean_c
    from fastingest import _split as split_c
    from fastingest import columns, lean, split

    assert fastingest.USE_EXTENSIONS
    assert fastingest.RingQueue is compiled.RingQueue
    assert split.split_payloads is split_c.split_payloads
    assert columns.read is columns_c.read
    assert lean.COMPILED and lean.LeanFront is lean_c.LeanFront
    for module in (compiled, split_c, columns_c, lean_c):
        assert module.__file__.endswith((".so", ".pyd"))


def test_no_extensions_env_selects_the_twins():
    code = (
        "import fastingest, fastingest.split as s, fastingest.lean as p, fastingest.columns as c; "
        "print(fastingest.RingQueue.__module__, s.split_payloads.__module__, "
        "p.LeanFront.__module__, p.COMPILED, fastingest.USE_EXTENSIONS, c.read)"
    )
    env = {**os.environ, "FASTINGEST_NO_EXTENSIONS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    twins = [
        "fastingest._queue_py",
        "fastingest._split_py",
        "fastingest._lean_py",  # _lean.py run as Python, though a build is installed
        "False",
        "False",
        "None",  # pyarrow's JSON reader reads every Parquet batch: the twin would be slower
    ]
    assert out.stdout.split() == twins, out.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_installs_into_a_fresh_venv_with_the_compiled_module(tmp_path):
    src = tmp_path / "src-copy"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "build",
            "dist",
            "*.egg-info",
            "*.so",
            "_queue.c",
            "_split.c",
            "_columns.c",
            "_lean.c",
            "__pycache__",
            ".hypothesis",
            ".pytest_cache",
            "bench",
            "tests",
            "fastingest-data",
        ),
    )
    dist = tmp_path / "dist"
    # --no-isolation: build with this environment's Cython and setuptools (pinned in pyproject).
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(dist),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("fastingest-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for core in ("_queue", "_split", "_columns"):
        assert any(n.startswith(f"fastingest/{core}.") and n.endswith(".so") for n in names), names
        assert f"fastingest/{core}.pyi" in names
    # _lean is compiled from Python source, which ships too: the no-extensions switch runs it.
    assert any(n.startswith("fastingest/_lean.") and n.endswith(".so") for n in names), names
    assert "fastingest/_lean.py" in names
    assert "fastingest/py.typed" in names

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    # --no-deps: the queue core imports nothing outside the standard library.
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
    code = (
        "import fastingest, fastingest._queue as c, fastingest._split as s, fastingest.split\n"
        "assert fastingest.USE_EXTENSIONS and fastingest.RingQueue is c.RingQueue\n"
        "assert fastingest.split.split_payloads is s.split_payloads\n"
        "q = fastingest.RingQueue(2); q.put_nowait(b'x'); assert q.get_nowait() == b'x'\n"
        "assert s.split_payloads(b'[{}]') == (b'{}\\n', 1, None)\n"
        "print(c.__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FASTINGEST_NO_EXTENSIONS"}
    out = subprocess.run([py, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).is_relative_to(env_dir)
