"""MLflow runs: open one, log into it from any step, and close it FINISHED or FAILED where it stopped.

Steps of one run may live in different processes (Prefect tasks, Dask workers), so a run travels as
its id, and each step makes it the active run only while it logs.

A process killed outright (``kill -9``, the out-of-memory killer) never closes its run: the run
records the process that opened it and the stage it is in (tags ``host``, ``pid``,
``pid_started``, ``stage``), and ``mark_stale_runs``, called when a retrain starts, marks FAILED
the runs whose process is gone, with the stage they died in.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline import registry, reproduce, versioning
from pipeline.params import Params, unsafe_overrides
from pipeline.pause import pause_point
from pipeline.settings import Settings

if TYPE_CHECKING:
    from pipeline.versioning import DataVersion

log = logging.getLogger(__name__)


def start_run(
    settings: Settings,
    params: Params,
    data_version: DataVersion,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Open the run every later step logs into, with the params, data version and git commit; returns its id.

    With ``parent_run_id`` the run is nested under that one (a sweep's candidates under the sweep).
    """
    import mlflow
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    registry.connect(settings)
    commit = versioning.git_commit(settings.home) or "unknown"
    # the parent is named by tag, not by mlflow's active-run stack: the parent is not active here
    nesting = {MLFLOW_PARENT_RUN_ID: parent_run_id} if parent_run_id else {}
    run_id = mlflow.start_run(run_name=run_name, tags=nesting or None).info.run_id
    with active(run_id):
        mlflow.log_params({**params.flat(), "data_version": data_version.short})
        mlflow.set_tags(
            {"data_version": data_version.md5, "git_commit": commit, "data_pushed": str(data_version.pushed)}
            | process_tags()
            | reproduce.as_tags(reproduce.environment())  # what `digits reproduce` compares machines by
            | (tags or {})
        )
        mlflow.log_dict(params.model_dump(), "params.json")
    return run_id


def override_tags(overrides: dict[str, Any] | None) -> dict[str, str]:
    """Tags that record a run's params overrides (``overrides``: JSON, "{}" for none), copied to the version it registers."""
    tags = {registry.OVERRIDES_TAG: json.dumps(overrides or {}, sort_keys=True, default=str)[:5000]}
    if unsafe := unsafe_overrides(overrides):
        tags["unsafe_overrides"] = ", ".join(unsafe)[:5000]
    return tags


@contextmanager
def active(run_id: str) -> Iterator[None]:
    """Make ``run_id`` the active run for logging, and leave it RUNNING: only ``finish_run`` ends it."""
    import mlflow

    if mlflow.active_run() is None or mlflow.active_run().info.run_id != run_id:
        mlflow.start_run(run_id=run_id)
    try:
        yield
    finally:
        mlflow.end_run(status="RUNNING")


def finish_run(settings: Settings, run_id: str, failed: bool = False, stopped_at: str | None = None) -> None:
    client = registry.connect(settings)
    if stopped_at:
        client.set_tag(run_id, "stopped_at", stopped_at)
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def process_tags() -> dict[str, str]:
    """What identifies this process for ``mark_stale_runs``: machine, pid, and its start time (pids are reused)."""
    import psutil

    return {"host": socket.gethostname(), "pid": str(os.getpid()), "pid_started": f"{psutil.Process().create_time():.2f}"}


def _process_alive(tags: dict[str, str]) -> bool | None:
    """Whether the process that opened a run still runs; None when that cannot be known here (another machine)."""
    import psutil

    if tags.get("host") != socket.gethostname() or "pid" not in tags:
        return None
    try:
        process = psutil.Process(int(tags["pid"]))
        return abs(process.create_time() - float(tags.get("pid_started", "0"))) < 1.0  # else: a reused pid
    except (psutil.NoSuchProcess, ValueError):
        return False


def mark_stale_runs(settings: Settings) -> list[str]:
    """Mark FAILED the RUNNING runs (training and monitoring) whose process is gone; returns a line about each.

    A run opened on this machine is stale when its process no longer runs. A run opened on another
    machine cannot be checked from here: it is stale once it has been RUNNING for
    ``settings.stale_run_hours``. Each gets ``stopped_at`` (the stage it died in) and ``failure``.
    """
    client = registry.connect(settings)
    experiments = [client.get_experiment_by_name(name) for name in (settings.experiment, settings.monitoring_experiment)]
    ids = [experiment.experiment_id for experiment in experiments if experiment is not None]
    running = client.search_runs(ids, "attributes.status = 'RUNNING'", max_results=1000) if ids else []
    now, marked = time.time(), []
    for run in running:
        tags = run.data.tags
        alive = _process_alive(tags)
        if alive or (alive is None and now - run.info.start_time / 1000 < settings.stale_run_hours * 3600):
            continue
        stage = tags.get("stage", "unknown")
        why = "its process ended without closing it (killed, or out of memory)" if alive is False else "no word from it"
        client.set_tag(run.info.run_id, "stopped_at", stage)
        client.set_tag(run.info.run_id, "failure", why)
        client.set_terminated(run.info.run_id, status="FAILED")
        marked.append(f"run {run.info.run_id} ({run.info.run_name}) marked FAILED: {why}, during {stage}")
        log.warning("%s", marked[-1])
    return marked


@dataclass
class TrackedRun:
    """An open run and the stage it is in (its ``stage`` tag too); ``close`` ends it early (a sweep candidate that failed)."""

    settings: Settings
    run_id: str
    _stage: str
    closed: bool = False

    @property
    def stage(self) -> str:
        return self._stage

    @stage.setter
    def stage(self, stage: str) -> None:
        """Enter ``stage``: recorded on the run, so a run whose process dies says where."""
        self._stage = stage
        _record_stage(self.settings, self.run_id, stage)

    def close(self, failed: bool = False, stopped_at: str | None = None) -> None:
        self.closed = True
        finish_run(self.settings, self.run_id, failed, stopped_at)


@contextmanager
def run_context(settings: Settings, run_id: str, stage: str) -> Iterator[TrackedRun]:
    """Close the run when the block ends: FINISHED, or FAILED with the stage it stopped at (``run.stage``)."""
    run = TrackedRun(settings, run_id, stage)
    _record_stage(settings, run_id, stage)
    try:
        yield run
    except BaseException:
        if not run.closed:
            try:
                run.close(failed=True, stopped_at=run.stage)
            except Exception as err:  # the error that stopped the run matters more than its status
                log.warning("could not mark MLflow run %s failed: %s", run_id, err)
        raise
    if not run.closed:
        run.close()


def _record_stage(settings: Settings, run_id: str, stage: str) -> None:
    registry.connect(settings).set_tag(run_id, "stage", stage)
    pause_point(stage)


def log_metrics(run_id: str, values: dict[str, float], step: int = 0) -> None:
    """All of ``values`` in one batched call: each MLflow call costs milliseconds on sqlite."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    MlflowClient().log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])


def log_epoch(run_id: str, epoch: int, values: dict[str, float]) -> None:
    """An epoch's metrics, with the epoch as their step."""
    log_metrics(run_id, values, step=epoch)
    pause_point("epoch")


def ui_command(settings: Settings, port: int) -> list[str]:
    """``mlflow server`` on 127.0.0.1 over the embedded store: the MLflow UI."""
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--backend-store-uri", settings.resolved_tracking_uri, "--workers", "1"]
    if settings.artifact_location:
        command += ["--default-artifact-root", settings.artifact_location]
    return command


def server_problem(url: str) -> str | None:
    """Why the tracking server at ``url`` does not answer (the connection error), or None when it does."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{url}/health", timeout=10).close()
    except urllib.error.HTTPError:
        return None  # it answered (perhaps asking for credentials): it is up
    except OSError as err:
        return str(err)
    return None
