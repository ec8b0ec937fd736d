"""`digits ui`, `digits serve` and `digits retrain` stop everything they started when they are told to stop.

A process manager sends SIGTERM, a closed terminal SIGHUP, Ctrl+C SIGINT: each is sent here to the
`digits` process alone (as those senders do), and then no process it started may survive and no port
stay bound. Every process a command starts is found by a marker in its environment (children inherit
it), so that one which left its parent's process group or outlived its parent is found too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from conftest import free_port, wait_for_http

pytestmark = pytest.mark.integration

DIGITS = str(Path(sys.executable).parent / "digits")
MARK = "DIGITS_TEST_PROCESS_MARK"
# how long a command may take to stop what it started (under a loaded machine)
STOP_SECONDS = 60


def _start(args: list[str], home: Path, mark: str, **env: str) -> subprocess.Popen:
    environment = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    environment.update(
        {
            "DIGITS_HOME": str(home),
            "BENTOML_HOME": str(home / "bentoml"),
            "BENTOML_DO_NOT_TRACK": "true",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            MARK: mark,
            **env,
        }
    )
    log = open(home / f"{args[0]}.log", "wb")  # noqa: SIM115 - the child holds it
    # a session of its own, as a command started from a shell: signals reach only what this test sends them to
    process = subprocess.Popen(
        [DIGITS, *args], cwd=home, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    log.close()
    return process


def _marked(mark: str) -> list[psutil.Process]:
    """Every live process that carries ``mark`` in its environment (zombies are gone already)."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.status() != psutil.STATUS_ZOMBIE and process.environ().get(MARK) == mark:
                found.append(process)
    return found


def _describe(processes: list[psutil.Process]) -> str:
    lines = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            lines.append(f"{process.pid} {' '.join(process.cmdline())[:160]}")
    return "\n".join(lines)


def _listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port`` (SO_REUSEADDR: a closed connection's TIME_WAIT does not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} not seen within {timeout:.0f} s")


def _assert_all_stopped(command: subprocess.Popen, mark: str, ports: list[int], home: Path, name: str) -> None:
    """Within STOP_SECONDS: the command has exited, no process it started is alive, no port of theirs is bound."""
    deadline = time.monotonic() + STOP_SECONDS
    survivors = _marked(mark)
    while time.monotonic() < deadline and (survivors or command.poll() is None):
        time.sleep(0.5)
        survivors = _marked(mark)
    output = (home / f"{name}.log").read_text(errors="replace")[-3000:]
    assert command.poll() is not None, f"`digits {name}` still runs {STOP_SECONDS} s after the signal:\n{output}"
    assert not survivors, f"`digits {name}` exited but left processes running:\n{_describe(survivors)}\n{output}"
    bound = [port for port in ports if _listening(port)]
    assert not bound, f"port(s) {bound} still bound after `digits {name}` stopped"


def _kill_marked(mark: str) -> None:
    """Cleanup whatever the test started, whatever happened."""
    for process in _marked(mark):
        with contextlib.suppress(psutil.Error):
            process.kill()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_digits_ui_stops_the_mlflow_server_and_its_job_processes(signum, tmp_path):
    mark, port = uuid.uuid4().hex, free_port()
    command = _start(["ui", "--port", str(port)], tmp_path, mark)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", command, timeout=180)
        # the MLflow server runs uvicorn beside a job runner and its consumer processes: wait for some of them
        _wait_for(lambda: len(_marked(mark)) >= 4, 60, "the MLflow server's job processes")
        command.send_signal(signum)
        _assert_all_stopped(command, mark, [port], tmp_path, "ui")
    finally:
        _kill_marked(mark)
        command.wait(timeout=10)


def test_digits_serve_stops_bentoml_and_its_workers_on_sighup(tmp_path):
    mark, port = uuid.uuid4().hex, free_port()
    command = _start(["serve", "--port", str(port)], tmp_path, mark)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/livez", command, timeout=180)
        command.send_signal(signal.SIGHUP)  # a closed terminal: BentoML's own answer to it is a reload
        _assert_all_stopped(command, mark, [port], tmp_path, "serve")
    finally:
        _kill_marked(mark)
        command.wait(timeout=10)


def _prefect_server_port(mark: str) -> int | None:
    """The port the temporary Prefect server listens on (it binds port 0: read from its sockets, not its command)."""
    for process in _marked(mark):
        with contextlib.suppress(psutil.Error):
            if "prefect" in " ".join(process.cmdline()) and "server" in process.cmdline():
                ports = {c.laddr.port for c in process.net_connections(kind="tcp4") if c.status == psutil.CONN_LISTEN}
                if ports:
                    return min(ports)
    return None


def test_digits_retrain_stops_its_prefect_server_on_sigterm(project):
    mark = uuid.uuid4().hex
    command = _start(["retrain"], project, mark)
    try:
        _wait_for(lambda: _prefect_server_port(mark) is not None, 120, "the temporary Prefect server")
        port = _prefect_server_port(mark)
        wait_for_http(f"http://127.0.0.1:{port}/api/health", command, timeout=180)
        command.send_signal(signal.SIGTERM)
        _assert_all_stopped(command, mark, [port], project, "retrain")
    finally:
        _kill_marked(mark)
        command.wait(timeout=10)


# a server that ignores SIGTERM and starts a helper in a session of its own, which ignores it too and
# outlives it: what a careless server does, and what run_server must still clean up
STUBBORN_SERVER = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
helper = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
subprocess.Popen([sys.executable, "-c", helper], start_new_session=True)
print("ready", flush=True)
time.sleep(600)
"""


def test_run_server_kills_a_server_that_ignores_sigterm_and_a_helper_that_left_its_group(tmp_path):
    mark = uuid.uuid4().hex
    runner = (
        "import sys; from cli.processes import run_server; "
        f"sys.exit(run_server([sys.executable, '-c', {STUBBORN_SERVER!r}], grace=2))"
    )
    env = {**os.environ, MARK: mark, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    command = subprocess.Popen([sys.executable, "-c", runner], env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert command.stdout.readline().strip() == "ready"
        _wait_for(lambda: len(_marked(mark)) == 3, 30, "the runner, the server and its helper")
        command.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (_marked(mark) or command.poll() is None):
            time.sleep(0.2)
        assert command.poll() == 128 + signal.SIGTERM
        assert not _marked(mark), _describe(_marked(mark))
    finally:
        _kill_marked(mark)
        command.wait(timeout=10)
