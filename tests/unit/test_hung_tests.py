"""A hung test fails on its own, its server is stopped, and the run goes on: the suite's pytest-timeout settings."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

from conftest import REPO

HANGS = '''
import os, signal, subprocess, time
from pathlib import Path

import pytest


@pytest.fixture
def server():
    """A stand-in for a server a test starts: a process of its own, stopped when the fixture ends."""
    process = subprocess.Popen(["sleep", "600"], start_new_session=True)
    Path("pid").write_text(str(process.pid))
    try:
        yield process
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_hangs(server):
    time.sleep(600)  # a server that never answers


def test_after_it():
    assert True
'''


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not open(f"/proc/{pid}/stat").read().split(") ", 1)[1].startswith("Z")


def test_a_hung_test_fails_alone_and_its_fixtures_stop_its_server(tmp_path):
    settings = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert int(settings.get("timeout", 0)) > 0, "no timeout: a hung server hangs the whole run"
    # the suite's method, with the limit scaled down so that this check takes seconds
    (tmp_path / "pytest.ini").write_text(f"[pytest]\ntimeout = 3\ntimeout_method = {settings.get('timeout_method', 'signal')}\n")
    (tmp_path / "test_hangs.py").write_text(HANGS)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_hangs.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    pid = int((tmp_path / "pid").read_text())
    try:
        assert "Timeout (>3.0s)" in done.stdout and "1 failed, 1 passed" in done.stdout, done.stdout[-2000:]
        assert not _alive(pid), "the hung test's server outlived it"
    finally:
        if _alive(pid):
            os.kill(pid, 9)
