"""A Prefect API server for one command, booting in a child process before this one imports Prefect.

With no server configured, Prefect starts a temporary one on the flow's first API call, and only
after this process has imported Prefect's server package, which is slow. Here
``prefect server start`` boots on the other core from the command's first second, while this
process imports the pipeline and prepares the MLflow store, and this process never imports the
server package at all.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO


class TemporaryServerError(RuntimeError):
    """The temporary Prefect server did not come up."""


class TemporaryPrefectServer:
    """``prefect server start`` on 127.0.0.1, API only, stopped when this process exits.

    The server binds port 0 (a free port of the system's choosing, so no other process can take it between a
    choice and the bind); it prints 0 in its banner, so ``port`` is read from the process's listening socket,
    and stays 0 until then.
    """

    def __init__(self, process: subprocess.Popen, port: int, log: IO[bytes]) -> None:
        self.process = process
        self.port = port
        self._log = log

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @classmethod
    def start_unless_configured(cls) -> TemporaryPrefectServer | None:
        """Start the server now, unless PREFECT_API_URL names one.

        A Prefect profile can name a server too, but reading it means importing Prefect, which takes a while:
        ``api()`` checks it and stops this server unused if so.
        """
        if _configured_api_url():
            return None
        log = tempfile.TemporaryFile()  # read back only to explain a failed start
        command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", "0"]
        # API only: no UI to build, no scheduler or other services for a single local flow run
        command += ["--no-ui", "--no-services", "--log-level", "WARNING"]
        server = cls(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), 0, log)
        atexit.register(server.stop)
        return server

    @contextmanager
    def api(self) -> Iterator[str | None]:
        """Point Prefect at this server once it answers, and yield its API URL; a server a profile names wins (None)."""
        from prefect.settings import (
            PREFECT_API_URL,
            PREFECT_SERVER_EPHEMERAL_ENABLED,
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
            PREFECT_UI_URL,
            temporary_settings,
        )

        if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
            self.stop()  # a profile names a server, or forbids temporary ones: Prefect's own rules apply
            yield None
            return
        self.wait_until_ready(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
        # no UI: Prefect's "View at <url>" lines would point at a page that is not there
        with temporary_settings(updates={PREFECT_API_URL: self.api_url, PREFECT_UI_URL: ""}):
            yield self.api_url

    def wait_until_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TemporaryServerError(
                    f"Prefect's temporary server exited with code {self.process.returncode} before answering:\n"
                    f"{self._output()}\nTo use a running Prefect server instead, set PREFECT_API_URL."
                )
            for port in [self.port] if self.port else _listening_ports(self.process.pid):
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                        self.port = port
                        return
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        output = self._output()
        self.stop()
        raise TemporaryServerError(
            f"Prefect's temporary server did not answer on {self.api_url} within {timeout:.0f} s:\n{output}\n"
            "A slow machine may need longer (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS), "
            "or set PREFECT_API_URL to a running Prefect server."
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def _output(self, chars: int = 3000) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-chars:].strip() or "(no output)"


@contextmanager
def prefect_api(server: TemporaryPrefectServer | None = None) -> Iterator[str | None]:
    """Run the block on a Prefect API and yield its URL: a configured server's, else a temporary one's.

    ``server`` is one started ahead (so that it boots while the caller imports); without it, one is
    started here unless a server is configured. A temporary server stops when this process exits,
    after Prefect's own exit handlers have sent it their last logs.
    """
    from prefect.settings import PREFECT_API_URL

    server = server or TemporaryPrefectServer.start_unless_configured()
    if server is None:
        yield PREFECT_API_URL.value()
        return
    with server.api() as api_url:
        yield api_url or PREFECT_API_URL.value()  # None: a profile names a server, which Prefect uses


def _listening_ports(pid: int) -> list[int]:
    """The TCP ports of 127.0.0.1 that process ``pid`` listens on (psutil comes with DVC, BentoML and Dask)."""
    import psutil

    try:
        connections = psutil.Process(pid).net_connections(kind="tcp4")
    except psutil.Error:
        return []
    return sorted({c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN and c.laddr.ip == "127.0.0.1"})


def _configured_api_url() -> str | None:
    if "prefect.settings" in sys.modules:  # already imported (a test harness, an embedding program): ask Prefect
        from prefect.settings import PREFECT_API_URL

        return PREFECT_API_URL.value()
    return os.environ.get("PREFECT_API_URL")
