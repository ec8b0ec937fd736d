"""MLflow runs: open one, log into it from any step, and close it FINISHED or FAILED where it stopped.

Steps of one run may live in different processes (Prefect tasks, Dask workers), so a run travels as
its id, and each step makes it the active run only while it logs.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline import registry, versioning
from pipeline.params import Params, unsafe_overrides
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
            {"data_version": data_version.md5, "git_commit": commit, "data_pushed": str(data_version.pushed), **(tags or {})}
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


@dataclass
class TrackedRun:
    """An open run and the stage it is in; ``close`` ends it early (a sweep candidate that failed)."""

    settings: Settings
    run_id: str
    stage: str
    closed: bool = False

    def close(self, failed: bool = False, stopped_at: str | None = None) -> None:
        self.closed = True
        finish_run(self.settings, self.run_id, failed, stopped_at)


@contextmanager
def run_context(settings: Settings, run_id: str, stage: str) -> Iterator[TrackedRun]:
    """Close the run when the block ends: FINISHED, or FAILED with the stage it stopped at (``run.stage``)."""
    run = TrackedRun(settings, run_id, stage)
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


def log_metrics(run_id: str, values: dict[str, float], step: int = 0) -> None:
    """All of ``values`` in one batched call: each MLflow call costs milliseconds on sqlite."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    MlflowClient().log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])


def log_epoch(run_id: str, epoch: int, values: dict[str, float]) -> None:
    """An epoch's metrics, with the epoch as their step."""
    log_metrics(run_id, values, step=epoch)


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
