"""Scale-out glue: a Prefect process work pool, the promotion limit, and deployments of the retraining flow and
of the monitor, which starts the retraining deployment when production drifts or corrections pile up.

`digits deploy` calls :func:`deploy`; `digits retrain --deployment` calls :func:`trigger` and :func:`follow`.
Both talk to the Prefect server that ``PREFECT_API_URL`` (or the active Prefect profile) names; the flow
itself runs on a worker started with ``prefect worker start --pool digits``, on this machine or another.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.settings import Settings

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun

FLOW_NAME = "retrain-digits"
ENTRYPOINT = "flows/retrain.py:retrain"
MONITOR_FLOW_NAME = "monitor-digits"
MONITOR_ENTRYPOINT = "flows/monitor.py:monitor"
HOW_TO_START = (
    "Start one with `prefect server start` and `export PREFECT_API_URL=http://127.0.0.1:4200/api`, "
    "or point PREFECT_API_URL at your shared Prefect server."
)


class DeploymentError(RuntimeError):
    """The Prefect server, work pool or deployment is missing or unusable; the message says what to run."""


def code_root() -> Path:
    """The folder that holds flows/ and pipeline/: the deployment's source and the worker's working directory."""
    return Path(__file__).resolve().parents[1]


def full_name(name: str) -> str:
    return f"{FLOW_NAME}/{name}"


def worker_command(pool: str) -> str:
    return f"prefect worker start --pool {pool}"


def run_environment(settings: Settings) -> dict[str, str]:
    """The environment a worker gives each run of the deployment (job variable ``env``)."""
    env = {
        # where the project lives and which store it uses: the worker's own folder does not matter
        "DIGITS_HOME": str(settings.home.resolve()),
        "DIGITS_EXPERIMENT": settings.experiment,
        "DIGITS_MODEL_NAME": settings.model_name,
        # `digits retrain --deployment` reads the flow's summary back: persist the flow's return value
        # (a small JSON dict) and nothing else; tasks pass settings and paths, not worth storing
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_TASKS_DEFAULT_PERSIST_RESULT": "false",
        "PREFECT_RESULTS_DEFAULT_SERIALIZER": "json",
        # as `digits retrain` sets for a local run: `pipeline` records reach the run's logs, libraries keep quiet
        # (its INFO progress lines only once something sets the `pipeline` logger to INFO, as the CLI does)
        "PREFECT_LOGGING_EXTRA_LOGGERS": "pipeline,app",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "GX_ANALYTICS_ENABLED": "false",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    if settings.tracking_uri:
        env["MLFLOW_TRACKING_URI"] = settings.tracking_uri
    return env


def api_url() -> str:
    """The configured Prefect API; without one Prefect would start a throw-away server that knows no deployment."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise DeploymentError(f"no Prefect server is configured (PREFECT_API_URL is not set). {HOW_TO_START}")
    return url


def ui_url(path: str) -> str | None:
    from prefect.settings import get_current_settings

    base = get_current_settings().ui_url
    return f"{base.rstrip('/')}/{path.lstrip('/')}" if base else None


@contextmanager
def server() -> Iterator[SyncPrefectClient]:
    """A client of the configured Prefect server, checked to answer."""
    from prefect.client.orchestration import get_client

    url = api_url()
    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
        if error is not None:
            raise DeploymentError(
                f"the Prefect server at {url} does not answer ({type(error).__name__}: {error}). {HOW_TO_START}"
            )
        yield client


# ---------------------------------------------------------------- digits deploy


@dataclass(frozen=True)
class Deployed:
    deployment_id: str
    name: str
    pool: str
    pool_created: bool
    source: Path
    cron: str | None
    paused: bool
    parameters: dict[str, Any]
    env: dict[str, str]
    url: str | None
    monitor_name: str
    monitor_cron: str | None
    monitor_parameters: dict[str, Any]


def ensure_pool(client: SyncPrefectClient, pool: str) -> bool:
    """Create a process work pool named ``pool`` unless it exists; True if it was created."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    try:
        existing = client.read_work_pool(pool)
    except ObjectNotFound:
        try:
            client.create_work_pool(
                WorkPoolCreate(
                    name=pool,
                    type=ProcessWorker.type,
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                    description="digits: workers run the retraining flow as a local process",
                )
            )
            return True
        except ObjectAlreadyExists:  # a worker started at the same moment made it
            existing = client.read_work_pool(pool)
    if existing.type != ProcessWorker.type:
        raise DeploymentError(
            f"work pool {pool!r} already exists with type {existing.type!r}; the flow needs a 'process' pool. "
            "Pass another name with --pool (or DIGITS_WORK_POOL)."
        )
    return False


def ensure_promotion_limit(client: SyncPrefectClient) -> None:
    """At most one promote task at a time across every worker (tag concurrency limit, created or reset to 1)."""
    from flows.retrain import PROMOTION_TAG

    client.create_concurrency_limit(tag=PROMOTION_TAG, concurrency_limit=1)


def deploy(
    settings: Settings,
    pool: str | None = None,
    name: str | None = None,
    cron: str | None = None,
    paused: bool = False,
    overrides: dict[str, Any] | None = None,
) -> Deployed:
    """Create or update the work pool, the promotion limit and the deployment ``retrain-digits/<name>``.

    The source is the folder holding the code (a worker runs the flow there); the project folder
    (DIGITS_HOME) and the tracking store travel in the deployment's environment, so one checkout of
    the code can serve any project. ``cron`` None or empty: no schedule. Running it again updates
    everything in place.
    """
    from flows.monitor import monitor
    from flows.retrain import retrain

    pool = pool or settings.work_pool
    name = name or settings.deployment
    cron = (cron or "").strip() or None
    monitor_cron = settings.monitor_cron.strip() or None
    # the defaults of a scheduled run; a run started by hand or by the monitor names its own trigger
    parameters = {"trigger": "schedule", **({"overrides": overrides} if overrides else {})}
    monitor_parameters = {"window": settings.monitor_window, "retrain_when_needed": True, "via_deployment": True}
    env = run_environment(settings)
    with server() as client:
        created = ensure_pool(client, pool)
        ensure_promotion_limit(client)
        deployment_id = _apply(
            client, retrain, ENTRYPOINT, name, pool, cron, paused, parameters, env,
            "Retrain, gate and promote the digit CNN (see README, Scaling out).",
        )  # fmt: skip
        _apply(
            client, monitor, MONITOR_ENTRYPOINT, name, pool, monitor_cron, paused, monitor_parameters, env,
            f"Watch the prediction log for drift; start {full_name(name)} when needed (see README).",
        )  # fmt: skip
    return Deployed(
        str(deployment_id),
        full_name(name),
        pool,
        created,
        code_root(),
        cron,
        paused,
        parameters,
        env,
        ui_url(f"deployments/deployment/{deployment_id}"),
        f"{MONITOR_FLOW_NAME}/{name}",
        monitor_cron,
        monitor_parameters,
    )


def _apply(
    client: SyncPrefectClient,
    flow: Any,
    entrypoint: str,
    name: str,
    pool: str,
    cron: str | None,
    paused: bool,
    parameters: dict[str, Any],
    env: dict[str, str],
    description: str,
) -> Any:
    """Create or update one deployment of ``flow``; ``cron`` None removes its schedules. Returns its id."""
    deployment = flow.from_source(source=str(code_root()), entrypoint=entrypoint).to_deployment(
        name=name,
        work_pool_name=pool,
        cron=cron,
        paused=paused,
        parameters=parameters,
        job_variables={"env": env},
        description=description,
        tags=["digits"],
    )
    deployment_id = deployment.apply()
    if cron is None:  # an update keeps old schedules unless they are removed
        for schedule in client.read_deployment_schedules(deployment_id):
            client.delete_deployment_schedule(deployment_id, schedule.id)
    return deployment_id


# ---------------------------------------------------------------- digits retrain --deployment


def trigger(
    settings: Settings, overrides: dict[str, Any] | None = None, name: str | None = None, reason: str = "manual"
) -> FlowRun:
    """Start a run of the deployment; ``overrides`` are applied on top of the deployment's default ones.

    ``reason`` becomes the run's trigger: manual (`digits retrain --deployment`), drift or feedback (the monitor).
    """
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    name = name or settings.deployment
    with server() as client:
        try:
            deployment = client.read_deployment_by_name(full_name(name))
        except ObjectNotFound:
            raise DeploymentError(
                f"no deployment {full_name(name)} on the Prefect server at {api_url()}. "
                "Create it with `digits deploy` (and start a worker), or set DIGITS_DEPLOYMENT to its name."
            ) from None
        parameters: dict[str, Any] = {"trigger": reason}
        if overrides:
            parameters["overrides"] = {**(deployment.parameters.get("overrides") or {}), **overrides}
        # timeout=0: return at once; follow() reports the states as they come
        return run_deployment(deployment.id, parameters=parameters, timeout=0, as_subflow=False)


def follow(
    flow_run_id: Any,
    on_state: Callable[[FlowRun], None],
    poll_seconds: float = 2.0,
    worker_hint_after: float = 30.0,
    on_hint: Callable[[str], None] | None = None,
) -> FlowRun:
    """Poll the run until it ends, calling ``on_state`` at each new state; returns the finished run.

    If it still waits for a worker after ``worker_hint_after`` seconds and no worker polls its pool,
    ``on_hint`` gets the command that starts one.
    """
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus

    started, last, hinted = time.monotonic(), None, False
    with server() as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state and run.state.name != last:
                last = run.state.name
                on_state(run)
            if run.state and run.state.is_final():
                return run
            waiting = run.state is None or run.state.is_scheduled()
            pool = run.work_pool_name
            if on_hint and waiting and not hinted and pool and time.monotonic() - started > worker_hint_after:
                online = WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"]))
                if not client.read_workers_for_work_pool(pool, worker_filter=online):
                    on_hint(f"no worker polls the work pool {pool!r}: start one with `{worker_command(pool)}`")
                hinted = True
            time.sleep(poll_seconds)


def run_summary(run: FlowRun) -> dict[str, Any]:
    """The summary the flow returned (the same dict as a local run), read from the result the worker stored."""
    try:
        summary = run.state.result()
    except Exception as err:
        raise DeploymentError(
            f"flow run {run.name} finished but its summary could not be read ({type(err).__name__}: {err}). "
            "Workers on other machines need shared result storage (PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK); "
            "`digits status` shows the champion."
        ) from err
    if not isinstance(summary, dict):
        raise DeploymentError(f"flow run {run.name} returned {type(summary).__name__}, not the flow's summary")
    return summary
