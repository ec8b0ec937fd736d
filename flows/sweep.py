"""The sweep flow: version and validate once, train every grid point in parallel on Dask, gate the best.

Grid points train as Prefect tasks on a ``DaskTaskRunner``: a local cluster sized for this machine
by default, the scheduler in ``DIGITS_DASK_ADDRESS`` at scale. Dask workers are separate processes
(other machines at scale): tasks get settings, params and run ids, and hand back run ids and a few
numbers, never arrays or models.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import Any
from urllib.parse import urlsplit

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from app import summaries, training
from app import sweep as sweeps
from app.training import Candidate, TrainedModel
from flows.retrain import gate, promote, recover, started_by_deployment, validate, version_data
from flows.temporary_server import TemporaryPrefectServer, prefect_api
from pipeline import registry, tracking
from pipeline.model import limit_threads
from pipeline.params import SWEEP_OVERRIDE_SECTIONS, GridPoint, Params, check_overrides, grid_points, load_params
from pipeline.settings import Settings, get_settings
from pipeline.versioning import DataVersion

log = logging.getLogger(__name__)

_task = dict(cache_policy=NO_CACHE)


def task_runner(cluster: sweeps.Cluster):
    """The flow's ``DaskTaskRunner`` for ``cluster`` (nothing starts until the flow runs)."""
    from prefect_dask import DaskTaskRunner

    if cluster.address:
        return DaskTaskRunner(address=cluster.address)
    threads = str(cluster.tf_threads)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": cluster.workers,
            "threads_per_worker": 1,  # one training per worker at a time
            "processes": True,
            "dashboard_address": None,
            # read by TensorFlow and OpenMP when a worker starts; the training task also sizes the pools itself
            "env": {"TF_NUM_INTRAOP_THREADS": threads, "TF_NUM_INTEROP_THREADS": threads, "OMP_NUM_THREADS": threads},
        }
    )


@task(name="open the sweep's MLflow run", retries=2, retry_delay_seconds=2, **_task)
def open_sweep_run(settings: Settings, params: Params, data_version: DataVersion, points: list[GridPoint]) -> str:
    return sweeps.open_sweep_run(settings, params, data_version, points)


@task(name="open a candidate's MLflow run", retries=2, retry_delay_seconds=2, **_task)
def open_point_run(settings: Settings, point: GridPoint, data_version: DataVersion, sweep_run_id: str) -> str:
    return sweeps.open_point_run(settings, point, data_version, sweep_run_id)


@task(name="train a candidate (Dask worker)", **_task)
def train_point(settings: Settings, params: Params, run_id: str, tf_threads: int | None, log_level: int) -> TrainedModel:
    """Runs in a Dask worker process: it reads data/ and the store itself, and returns a run id and two numbers."""
    # a worker has its own logging: show the per-epoch lines as the flow's process would
    for ours in ("pipeline", "app"):
        logging.getLogger(ours).setLevel(log_level)
    if tf_threads:
        limit_threads(tf_threads)
    return training.train(settings, params, run_id, tags={"dask_worker": _worker_name()})


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):  # not on a Dask worker
        return "local"


@task(name="evaluate the chosen candidate on the test set", **_task)
def evaluate(settings: Settings, trained: TrainedModel) -> Candidate:
    return training.evaluate(settings, trained)


def _train_all(
    settings: Settings, points: list[GridPoint], runs: list[tracking.TrackedRun], tf_threads: int | None
) -> tuple[dict[str, TrainedModel], dict[str, str]]:
    """Train every grid point at once on the task runner: the trained models, and why the others failed."""
    logger = get_run_logger()
    level = logging.getLogger("pipeline").getEffectiveLevel()
    futures = [train_point.submit(settings, p.params, r.run_id, tf_threads, level) for p, r in zip(points, runs, strict=True)]
    trained: dict[str, TrainedModel] = {}
    failures: dict[str, str] = {}
    for point, run, future in zip(points, runs, futures, strict=True):
        try:
            trained[point.name] = future.result()
        except Exception as err:  # one failed grid point does not sink the others
            failures[point.name] = f"{type(err).__name__}: {err}".splitlines()[0][:300]  # the task run has it all
            logger.warning("candidate %s (%s) failed: %s", point.name, point.label, failures[point.name])
            run.close(failed=True, stopped_at="training")
    return trained, failures


@task(name="record the overrides on the runs", retries=2, retry_delay_seconds=2, **_task)
def record_overrides(settings: Settings, run_ids: list[str], overrides: dict[str, Any] | None) -> None:
    client = registry.connect(settings)
    for run_id in run_ids:
        for key, value in tracking.override_tags(overrides).items():
            client.set_tag(run_id, key, value)


@flow(name="sweep-digits", log_prints=True)
def sweep_flow(
    overrides: dict[str, Any] | None = None, tf_threads: int | None = None, where: str = "", allow_unsafe_overrides: bool = False
) -> dict[str, Any]:
    """Train every grid point in parallel, gate the one with the best validation accuracy, promote it if it passes.

    ``overrides`` maps dotted params keys to values (``{"sweep.grid": {...}, "train.epochs": 2}``);
    ``tf_threads`` sizes TensorFlow in each training; ``where`` names the cluster, for the log. As in
    the retraining flow, overrides outside ``model.*``, ``train.*`` and ``sweep.*`` need ``allow_unsafe_overrides``.
    """
    logger = get_run_logger()
    settings = get_settings()
    check_overrides(
        overrides, deployment=started_by_deployment(), allow_unsafe=allow_unsafe_overrides, safe=SWEEP_OVERRIDE_SECTIONS
    )
    params = load_params(settings.params_path, overrides)
    points = grid_points(params)
    logger.info("%d candidate(s) on %s: %s", len(points), where or "the task runner", "; ".join(p.label for p in points))
    for line in recover(settings):
        logger.warning("%s", line)
    data_version = version_data(settings, params)
    with ExitStack() as runs:
        # closed in reverse: point runs still open when something fails are marked FAILED, then the sweep's run
        sweep_run = runs.enter_context(
            tracking.run_context(settings, open_sweep_run(settings, params, data_version, points), "validation")
        )
        validate(settings, params, sweep_run.run_id)
        sweep_run.stage = "training"
        point_runs = [
            runs.enter_context(
                tracking.run_context(settings, open_point_run(settings, p, data_version, sweep_run.run_id), "sweep stopped")
            )
            for p in points
        ]
        record_overrides(settings, [sweep_run.run_id, *(r.run_id for r in point_runs)], overrides)
        trained, failures = _train_all(settings, points, point_runs, tf_threads)
        if not trained:
            raise RuntimeError(f"every sweep candidate failed: {failures}")
        # the choice sees validation scores only; the test set is first used on the chosen one, below
        chosen = training.best(list(trained.values()))
        chosen_name = next(name for name, model in trained.items() if model is chosen)
        sweep_run.stage = "evaluation"
        candidate = evaluate(settings, chosen)
        sweep_run.stage = "gate"
        decision = gate(settings, params, candidate)
        sweep_run.stage = "promotion"
        outcome = promote(settings, candidate, decision)
        # no dvc.lock entry, unlike retrain: the chosen grid point is not params.yaml's own configuration
        table = sweeps.rows(points, [r.run_id for r in point_runs], trained, failures, chosen_name)
        sweeps.record(settings, sweep_run.run_id, table, outcome, chosen)
    create_markdown_artifact(
        summaries.sweep_markdown(table) + "\n\n" + outcome.decision.to_markdown(), key="sweep", description="sweep"
    )
    summary = {
        **summaries.summarize(data_version, chosen.run_id, outcome, candidate),
        "sweep_run_id": sweep_run.run_id,
        "selected": chosen_name,
        "candidates": table,
    }
    print(summaries.render_sweep(summary))
    return summary


def sweep(
    overrides: dict[str, Any] | None = None,
    dask_address: str | None = None,
    params: Params | None = None,
    server: TemporaryPrefectServer | None = None,
    allow_unsafe_overrides: bool = False,
) -> dict[str, Any]:
    """Run the sweep flow on a Dask cluster: ``dask_address`` (or DIGITS_DASK_ADDRESS), else a local one.

    Dask workers report to the Prefect API this process uses: a temporary server (``server``, or one
    started here) unless one is configured (``PREFECT_API_URL``), so that the workers do not each start their own.
    """
    settings = get_settings()
    params = params or load_params(settings.params_path, overrides)  # bad params stop before any cluster
    cluster = sweeps.plan_cluster(settings, len(grid_points(params)), dask_address)
    with prefect_api(server) as api_url:
        if cluster.address and api_url and urlsplit(api_url).hostname in ("127.0.0.1", "localhost", "::1"):
            log.warning(
                "the Prefect API at %s is on this machine only: Dask workers on other machines cannot report to it. "
                "Set PREFECT_API_URL to a Prefect server they can reach.",
                api_url,
            )
        run = sweep_flow.with_options(task_runner=task_runner(cluster))
        return run(
            overrides=overrides,
            tf_threads=cluster.tf_threads,
            where=cluster.describe(),
            allow_unsafe_overrides=allow_unsafe_overrides,
        )
