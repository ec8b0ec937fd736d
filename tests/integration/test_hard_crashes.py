"""`digits retrain` killed with SIGKILL at each stage loses nothing.

One project for the module, one retrain after another, each killed at a named pause point
(``pipeline/pause.py``): while ingesting, after an epoch of training, after registering a version,
and between the promotion's alias writes. After each kill the champion and its aliases are
consistent and the data version is intact; the next retrain marks the dead run FAILED with the
stage it died in, finishes the interrupted promotion, and the last one promotes normally.
Three of the retrains train in full; the Prefect API is one server for the module.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, make_project, stop_process_group, wait_for_http

from pipeline import registry, versioning
from pipeline.data import has_dataset, load_dataset
from pipeline.settings import Settings

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
STAGE_TIMEOUT = 900.0  # a full retrain on a shared CPU, with room


def _environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIGITS_", "PREFECT_", "MLFLOW_"))}
    env.update(DO_NOT_TRACK="1", TF_CPP_MIN_LOG_LEVEL="3", PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra)
    return env


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory) -> Iterator[str]:
    """One Prefect server for every retrain of the module (each would otherwise start its own)."""
    folder, port = tmp_path_factory.mktemp("prefect"), free_port()
    env = _environment(
        PREFECT_HOME=str(folder / "home"), PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{folder / 'prefect.db'}"
    )
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui", "--no-services"]
    with open(folder / "server.log", "wb") as log:
        process = subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/api/health", process, timeout=600)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        stop_process_group(process)


@pytest.fixture(scope="module")
def home(tmp_path_factory, slice_npz) -> Path:
    return make_project(tmp_path_factory.mktemp("crashes") / "project", slice_npz)


class Retrains:
    """`digits retrain` in the project, as a person runs it; ``killed`` stops one with SIGKILL at a pause point."""

    def __init__(self, home: Path, api: str) -> None:
        self.home, self.api = home, api
        self.settings = Settings(home=home, MLFLOW_TRACKING_URI=None)

    def _start(self, name: str, sets: tuple[str, ...], **extra: str) -> tuple[subprocess.Popen, Path]:
        log = self.home.parent / f"retrain-{name}.log"
        env = _environment(
            DIGITS_HOME=str(self.home), PREFECT_API_URL=self.api, PREFECT_HOME=str(self.home.parent / "cli"), **extra
        )
        command = [str(BIN / "digits"), "retrain", "--json", *(part for s in sets for part in ("--set", s))]
        with open(log, "wb") as err, open(log.with_suffix(".json"), "wb") as out:
            process = subprocess.Popen(command, cwd=self.home, env=env, stdout=out, stderr=err, start_new_session=True)
        return process, log

    def killed(self, pause_at: str, *sets: str) -> None:
        marker = self.home.parent / f"paused-at-{pause_at}"
        process, log = self._start(pause_at, sets, DIGITS_TEST_PAUSE_AT=pause_at, DIGITS_TEST_PAUSE_FILE=str(marker))
        try:
            deadline = time.monotonic() + STAGE_TIMEOUT
            while not marker.exists():
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the retrain never reached {pause_at} (exit {process.poll()}):\n{_tail(log)}")
                time.sleep(0.5)
            assert int(marker.read_text()) == process.pid  # the `digits retrain` process itself, not a child
            os.kill(process.pid, signal.SIGKILL)
            assert process.wait(timeout=30) == -signal.SIGKILL
        finally:
            stop_process_group(process, first=signal.SIGKILL)  # anything it started

    def completed(self, *sets: str) -> dict:
        process, log = self._start("completed", sets)
        try:
            process.wait(timeout=STAGE_TIMEOUT)
        finally:
            stop_process_group(process)
        output = log.with_suffix(".json").read_text(errors="replace")
        assert process.returncode == 0, _tail(log) + output[-3000:]
        return json.loads(output[output.index("{\n") :])

    # ------------------------------------------------------------ what the store says

    @property
    def client(self):
        return registry.connect(self.settings)

    def runs(self, status: str | None = None) -> list:
        experiment = self.client.get_experiment_by_name(self.settings.experiment)
        if experiment is None:
            return []
        found = self.client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
        return [run for run in found if status is None or run.info.status == status]

    def alias(self, alias: str = registry.CHAMPION) -> str | None:
        return registry.alias_version(self.client, self.settings.model_name, alias)

    def history(self) -> list[tuple[str, str | None]]:
        return [(e["version"], e["from"]) for e in registry.promotion_history(self.client, self.settings.model_name)]

    def assert_data_intact(self) -> None:
        if (self.home / "data.dvc").exists():
            assert versioning.is_checked_out(self.home, self.settings.data_dir), "data/ differs from the version data.dvc names"
            load_dataset(self.settings.data_dir)


def _tail(log: Path, chars: int = 5000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""


def _open_run_and_stop(home: str, marker: str) -> None:
    """Open a run as the flows do, and stop in its ``gate`` stage (the pause point), until killed."""
    os.environ.update(DIGITS_HOME=home, DIGITS_TEST_PAUSE_AT="gate", DIGITS_TEST_PAUSE_FILE=marker)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from pipeline import tracking
    from pipeline.params import load_params
    from pipeline.settings import get_settings
    from pipeline.versioning import DataVersion

    settings = get_settings()
    run_id = tracking.start_run(settings, load_params(settings.params_path), DataVersion("0" * 32, 4, 0, False))
    with tracking.run_context(settings, run_id, "validation") as run:
        run.stage = "gate"


def _paused_run(home: Path, name: str):
    marker = home.parent / f"{name}.paused"
    process = multiprocessing.get_context("spawn").Process(target=_open_run_and_stop, args=(str(home), str(marker)))
    process.start()
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert process.is_alive() and time.monotonic() < deadline, "the run never reached its gate stage"
        time.sleep(0.2)
    return process


def test_runs_whose_process_died_are_marked_failed_with_their_stage(tmp_path, slice_npz):
    from app import recovery

    home = make_project(tmp_path / "project", slice_npz)
    settings = Settings(home=home, MLFLOW_TRACKING_URI=None)
    dead, alive = _paused_run(home, "dead"), _paused_run(home, "alive")
    try:
        os.kill(dead.pid, signal.SIGKILL)
        dead.join(timeout=30)
        client = registry.connect(settings)
        experiment = client.get_experiment_by_name(settings.experiment).experiment_id
        runs = {run.data.tags["pid"]: run.info.run_id for run in client.search_runs([experiment])}
        assert {client.get_run(run_id).info.status for run_id in runs.values()} == {"RUNNING"}

        done = recovery.recover(settings)
        killed = client.get_run(runs[str(dead.pid)])
        assert killed.info.status == "FAILED", done
        assert killed.data.tags["stopped_at"] == "gate" and "killed" in killed.data.tags["failure"]
        assert any(runs[str(dead.pid)] in line and "during gate" in line for line in done)
        assert client.get_run(runs[str(alive.pid)]).info.status == "RUNNING"  # its process still runs

        # a run opened on another machine cannot be checked from here: only its age makes it stale
        client.set_tag(runs[str(alive.pid)], "host", "another-machine")
        assert recovery.recover(settings) == []
        aged = Settings(home=home, MLFLOW_TRACKING_URI=None, stale_run_hours=1e-6)
        assert len(recovery.recover(aged)) == 1 and client.get_run(runs[str(alive.pid)]).info.status == "FAILED"
    finally:
        for process in (dead, alive):
            process.kill()
            process.join(timeout=30)


@pytest.mark.timeout(4 * STAGE_TIMEOUT)
def test_retrains_killed_at_each_stage_lose_nothing(home, prefect_api):
    retrains = Retrains(home, prefect_api)

    # ingest: half the dataset written, no version recorded, no run opened
    retrains.killed("ingest")
    assert not has_dataset(retrains.settings.data_dir) and not (home / "data.dvc").exists()
    assert retrains.runs() == []

    # training, after its first epoch: the run stays RUNNING (nothing closes it); the data version is whole
    retrains.killed("epoch")
    retrains.assert_data_intact()
    [training] = retrains.runs("RUNNING")
    assert training.data.tags["stage"] == "training" and training.data.tags["pid"]

    # registration: the next retrain marks the dead run FAILED where it died; this one dies with v1 registered
    retrains.killed("registered")
    retrains.assert_data_intact()
    failed = retrains.client.get_run(training.info.run_id)
    assert failed.info.status == "FAILED" and failed.data.tags["stopped_at"] == "training", failed.data.tags
    assert "killed" in failed.data.tags["failure"]
    [registering] = retrains.runs("RUNNING")
    assert [v.version for v in registry.list_versions(retrains.client, retrains.settings.model_name)] == ["1"]
    assert retrains.alias() is None and retrains.history() == []

    # between the alias writes: champion moved to v2, the rest of the promotion not yet written
    retrains.killed("alias-writes")
    retrains.assert_data_intact()
    assert retrains.client.get_run(registering.info.run_id).data.tags["stopped_at"] == "promotion"
    [promoting] = retrains.runs("RUNNING")
    assert retrains.alias() == "2" and retrains.alias(registry.PREVIOUS) is None
    assert retrains.history() == []  # the promotion's record is what the next start finishes

    # the next retrain finishes v2's promotion, marks the dead run FAILED, and promotes normally
    summary = retrains.completed("train.seed=7")
    assert summary["promoted"], summary["reasons"]
    dead = retrains.client.get_run(promoting.info.run_id)
    assert dead.info.status == "FAILED" and dead.data.tags["stopped_at"] == "promotion"
    assert retrains.runs("RUNNING") == []
    assert summary["champion_version"] == retrains.alias() == "3" and retrains.alias(registry.PREVIOUS) == "2"
    assert retrains.history() == [("2", None), ("3", "2")]
    repaired = registry.get_version(retrains.client, retrains.settings.model_name, "2")
    assert repaired.promoted_at and repaired.promotion_reason
    retrains.assert_data_intact()
