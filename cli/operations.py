"""``digits ui`` and ``digits deploy``: the MLflow UI, and the retraining flow deployed to a Prefect server."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cli.common import SetOption, check_overrides, fail, load, parse_sets, quiet_libraries, reported_errors


def ui(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
) -> None:
    """Open the MLflow UI on the embedded store: runs, plots, data versions, registry.

    With MLFLOW_TRACKING_URI set to a tracking server (http://...), nothing starts here: the
    server serves the UI, and this prints its address.
    """
    from cli.processes import run_server
    from pipeline import registry, tracking
    from pipeline.settings import get_settings

    settings = get_settings()
    if url := settings.tracking_server:
        if problem := tracking.server_problem(url):
            fail(
                f"MLFLOW_TRACKING_URI points at the tracking server {url}, which does not answer ({problem}). "
                "Start it (`mlflow server ...`), fix MLFLOW_TRACKING_URI, or unset it to use the embedded store."
            )
        typer.echo(
            f"The tracking server in MLFLOW_TRACKING_URI serves the MLflow UI: open {url}\n"
            "(runs, plots, data versions, the registry). Nothing was started here; unset MLFLOW_TRACKING_URI "
            "for the embedded store's UI."
        )
        return
    registry.connect(settings)
    typer.echo(f"MLflow UI on http://127.0.0.1:{port} (Ctrl-C to stop)")
    # the MLflow server runs uvicorn, a job runner and its consumer processes: all stop with this command
    raise typer.Exit(run_server(tracking.ui_command(settings, port)))


def deploy(
    cron: Annotated[
        str | None,
        typer.Option(help="When to retrain, as cron in UTC (default: DIGITS_RETRAIN_CRON, Mondays 03:00). '' for no schedule."),
    ] = None,
    pool: Annotated[
        str | None, typer.Option(help="Process work pool to create or reuse (default: DIGITS_WORK_POOL, digits).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Deployment name (default: DIGITS_DEPLOYMENT, digits).")] = None,
    paused: Annotated[bool, typer.Option(help="Create the schedule paused; resume it in the Prefect UI.")] = False,
    sets: SetOption = None,
) -> None:
    """Deploy the retraining flow and the monitor to the Prefect server in PREFECT_API_URL, to run on workers.

    Creates (or updates) a process work pool, a concurrency limit of one on promotion across all
    workers, and the deployment retrain-digits/<name>: the flow from this code folder, run for the
    project in DIGITS_HOME, on a schedule, with --set values (model.* and train.* only) as default parameters. Beside it,
    monitor-digits/<name> runs `digits monitor --retrain-when-needed` every DIGITS_MONITOR_CRON (hourly)
    and starts the retraining deployment on drift or when enough corrections are ready. Then start a
    worker (`prefect worker start --pool digits`) and trigger runs with `digits retrain --deployment`,
    the Prefect UI or its API.
    """
    quiet_libraries()
    from flows import deployment
    from flows.retrain import PROMOTION_TAG
    from pipeline.settings import get_settings

    settings = get_settings()
    overrides = parse_sets(sets)
    check_overrides(overrides, deployment=True)  # the worker would refuse every run
    if overrides and settings.params_path.exists():
        load(overrides)
    with reported_errors():
        done = deployment.deploy(
            settings,
            pool=pool,
            name=name,
            cron=settings.retrain_cron if cron is None else cron,
            paused=paused,
            overrides=overrides,
        )
    schedule = f"{done.cron} (UTC){', paused' if done.paused else ''}" if done.cron else "none (runs start on demand)"
    typer.echo(f"work pool        {done.pool} (process, {'created' if done.pool_created else 'already there'})")
    typer.echo(f"promotion limit  tag {PROMOTION_TAG}: one promotion at a time across workers")
    typer.echo(f"deployment       {done.name}  {done.url or done.deployment_id}")
    typer.echo(f"  code           {done.source} ({deployment.ENTRYPOINT})")
    typer.echo(f"  project        {done.env['DIGITS_HOME']}")
    typer.echo(f"  schedule       {schedule}")
    typer.echo(f"  parameters     {json.dumps(done.parameters) if done.parameters else 'params.yaml as it is'}")
    monitor_schedule = f"{done.monitor_cron} (UTC){', paused' if done.paused else ''}" if done.monitor_cron else "none"
    typer.echo(f"monitor          {done.monitor_name}: {monitor_schedule}, {json.dumps(done.monitor_parameters)}")
    typer.echo(f"  starts         {done.name} on drift or when monitor.min_feedback_to_retrain corrections are ready")
    typer.echo(
        f"\nStart a worker (keep it running; workers on more machines can share the pool):\n"
        f"    {deployment.worker_command(done.pool)}\n"
        "Then trigger a run: `digits retrain --deployment`, the Prefect UI, or "
        f"`prefect deployment run {done.name}`."
    )
