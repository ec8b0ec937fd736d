"""Helpers for the tracking-server tests: a real PostgreSQL and a real ``mlflow server``.

``mlflow server`` binds port 0 itself (its port is read back). PostgreSQL cannot (its port also names
its socket file; 0 is outside its range): it gets a free port, and a new one when another process took
that port before PostgreSQL bound it.

PostgreSQL is Debian's ``postgresql`` package: a throw-away cluster (``initdb``) in a temporary folder,
listening on 127.0.0.1 only, with its unix socket in that folder too. PostgreSQL refuses to run as
root, so under root it runs as the ``postgres`` system user the package creates. The MLflow server
keeps runs and the registry in that database and serves artifacts from a folder of its own
(``--artifacts-destination``), so clients read and write artifacts only through HTTP. It runs
MLflow's basic auth (``--app-name basic-auth``, its users in a database of their own): an admin
user for training and promotion, a read-only user for serving replicas, nothing for anyone else.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from conftest import bound_port, free_port, stop_process_group, wait_for_http

ADMIN, READER = "digits-admin", "digits-reader"  # MLflow users: training and promotion; serving replicas
SUPERUSER = "digits"  # the cluster's superuser (initdb -U); trust authentication on 127.0.0.1 only
INSTALL_HINT = "apt-get install postgresql (tests/run does it when it runs as root on Debian)"


def postgres_bin(name: str) -> Path:
    """A PostgreSQL server program: on PATH, else in Debian's versioned folder (newest version)."""
    found = shutil.which(name)
    if found:
        return Path(found)
    # Debian installs the server programs outside PATH, one folder per major version
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]), reverse=True)
    if not candidates:
        raise RuntimeError(f"PostgreSQL's `{name}` is not installed: {INSTALL_HINT}")
    return candidates[0]


def _run_as() -> str | None:
    """The user to run PostgreSQL as: None for the current user, ``postgres`` when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError(
            f"running as root and there is no `postgres` system user to run PostgreSQL as: {INSTALL_HINT}"
        ) from None
    return "postgres"


class PortTaken(RuntimeError):
    """Another process bound the chosen port first."""


@dataclass
class Postgres:
    """A throw-away PostgreSQL cluster on 127.0.0.1:``port``; ``stop()`` stops it and deletes its files."""

    port: int = field(default_factory=free_port)
    root: Path | None = None
    process: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    def url(self, database: str, driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.root and self.log_path.exists() else ""

    def start(self, timeout: float = 60.0, attempts: int = 3) -> Postgres:
        """initdb and start; when the port was taken between choosing it and binding it, again on another port."""
        for attempt in range(attempts):
            try:
                return self._start(timeout)
            except PortTaken:
                self.stop()
                if attempt == attempts - 1:
                    raise
                self.port, self.root, self.process = free_port(), None, None
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> Postgres:
        initdb, postgres = postgres_bin("initdb"), postgres_bin("postgres")
        user = _run_as()
        # the system temporary folder, not pytest's: pytest's folders are private to the user running the tests
        self.root = Path(tempfile.mkdtemp(prefix="digits-postgres-"))
        (self.root / "socket").mkdir()
        if user:
            for path in (self.root, self.root / "socket"):
                shutil.chown(path, user, user)
        as_user = {"user": user, "group": user, "extra_groups": []} if user else {}
        data = self.root / "data"
        init = subprocess.run(
            [str(initdb), "-D", str(data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"],
            cwd=self.root,
            capture_output=True,
            text=True,
            **as_user,
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed ({init.returncode}):\n{init.stdout}{init.stderr}")
        with open(self.log_path, "wb") as log:
            # fsync off: a test cluster that dies is thrown away anyway
            self.process = subprocess.Popen(
                [
                    str(postgres),
                    "-D",
                    str(data),
                    "-p",
                    str(self.port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    f"unix_socket_directories={self.root / 'socket'}",
                    "-c",
                    "fsync=off",
                ],
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **as_user,
            )
        self._wait(timeout)
        return self

    def _wait(self, timeout: float) -> None:
        import psycopg2

        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                if "could not bind" in self.log() and "in use" in self.log():
                    raise PortTaken(f"port {self.port} was taken before postgres bound it")
                raise RuntimeError(f"postgres exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                psycopg2.connect(self.url("postgres", driver="postgresql"), connect_timeout=2).close()
                return
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"postgres did not accept connections within {timeout:.0f} s:\n{self.log()[-3000:]}"
                    ) from None
                time.sleep(0.2)

    def create_database(self, name: str) -> str:
        """CREATE DATABASE ``name``; returns its SQLAlchemy URL (psycopg2 driver)."""
        import psycopg2

        connection = psycopg2.connect(self.url("postgres", driver="postgresql"))
        try:
            connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return self.url(name)

    def query(self, database: str, sql: str) -> list[tuple]:
        """Rows of one query, straight from the database (to see what MLflow stored there)."""
        import psycopg2

        connection = psycopg2.connect(self.url(database, driver="postgresql"))
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql)
                return cursor.fetchall()
        finally:
            connection.close()

    def stop(self) -> None:
        try:
            if self.process is not None and self.process.poll() is None:
                self.process.send_signal(signal.SIGINT)  # "fast" shutdown: disconnect clients, stop now
                try:
                    self.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait(timeout=10)
        finally:
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)


def auth_config(path: Path, database_uri: str) -> Path:
    """MLflow's basic-auth configuration: users in ``database_uri``; every user may read, none may write by default."""
    path.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {database_uri}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # a password check costs a PBKDF2 hash: the service asks every few seconds
        "auth_cache_ttl_seconds = 60\n"
    )
    return path


@dataclass
class TrackingServer:
    """``mlflow server`` with a PostgreSQL backend store, a served artifact store and basic auth, in its own process group.

    With ``auth_database_uri`` the server runs MLflow's basic auth with its users there: ``ADMIN`` (an
    admin) and ``READER`` (default permission READ: reads everything, changes nothing it did not create).
    """

    backend_store_uri: str
    artifacts: Path
    auth_database_uri: str | None = None
    port: int = 0  # read back once the server listens
    process: subprocess.Popen | None = None
    passwords: dict[str, str] = field(
        default_factory=lambda: {ADMIN: secrets.token_urlsafe(16), READER: secrets.token_urlsafe(16)}
    )

    def credentials(self, user: str) -> dict[str, str]:
        """The environment an MLflow client needs to act as ``user``."""
        return {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": self.passwords[user]}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.artifacts.parent / "mlflow-server.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 900.0) -> TrackingServer:
        self.artifacts.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            self.backend_store_uri,
            "--serve-artifacts",
            "--artifacts-destination",
            str(self.artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            "0",  # uvicorn binds a free port itself
            "--workers",
            "1",  # the machine has 2 cores; one worker answers a test's requests
        ]
        # no background job runner: it serves GenAI features this project does not use, and costs processes
        env = {**os.environ, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        if self.auth_database_uri:
            command += ["--app-name", "basic-auth"]
            env.update(
                MLFLOW_AUTH_CONFIG_PATH=str(auth_config(self.artifacts.parent / "basic_auth.ini", self.auth_database_uri)),
                MLFLOW_AUTH_ADMIN_USERNAME=ADMIN,  # created on the first start
                MLFLOW_AUTH_ADMIN_PASSWORD=self.passwords[ADMIN],
                MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
            )
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, cwd=self.artifacts.parent, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self.port = bound_port(self.process, "/health", timeout)
            wait_for_http(f"{self.url}/health", self.process, timeout=timeout)
        except (RuntimeError, TimeoutError) as err:
            raise RuntimeError(f"{err}\n{self.log()[-4000:]}") from None
        if self.auth_database_uri:
            self._create_user(READER)
        return self

    def _create_user(self, user: str) -> None:
        """A user with the default permission (READ), created by the admin through the server's API."""
        import httpx

        response = httpx.post(
            f"{self.url}/api/2.0/mlflow/users/create",
            json={"username": user, "password": self.passwords[user]},
            auth=(ADMIN, self.passwords[ADMIN]),
            timeout=60,
        )
        if response.status_code != 200:
            raise RuntimeError(f"creating the MLflow user {user} failed ({response.status_code}): {response.text[:500]}")

    def stop(self) -> None:
        if self.process is not None:  # `mlflow server` runs its web server as a child: the whole group goes
            stop_process_group(self.process)


@dataclass
class Infrastructure:
    postgres: Postgres
    database: str
    server: TrackingServer


@contextlib.contextmanager
def tracking_infrastructure(workdir: Path, database: str = "mlflow") -> Iterator[Infrastructure]:
    """PostgreSQL, a database in it (and one for MLflow's users), and an MLflow server with basic auth on it; both
    stopped on exit, even after a failure."""
    postgres = Postgres()
    server: TrackingServer | None = None
    try:
        postgres.start()
        backend = postgres.create_database(database)
        server = TrackingServer(backend, workdir / "artifacts", postgres.create_database(f"{database}_auth"))
        server.start()
        yield Infrastructure(postgres, database, server)
    finally:
        try:
            if server is not None:
                server.stop()
        finally:
            postgres.stop()
