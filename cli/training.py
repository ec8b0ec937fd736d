"""``digits retrain`` and ``digits sweep``: the Prefect flows, here or on a deployment's workers."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli.common import (
    NOTHING_DONE,
    JsonOption,
    SetOption,
    UnsafeOption,
    check_overrides,
    fail,
    load,
    parse_sets,
    quiet_libraries,
    reported_errors,
)

if TYPE_CHECKING:
    from pipeline.settings import Settings


def retrain(
    sets: SetOption = None,
    as_json: JsonOption = False,
    on_deployment: Annotated[
        bool,
        typer.Option(
            "--deployment",
            help="Run on a worker instead: trigger the deployment made by `digits deploy` on the Prefect server in "
            "PREFECT_API_URL, follow it and print its summary.",
        ),
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="With --deployment: follow the run to its end, or only start it.")
    ] = True,
    allow_unsafe: UnsafeOption = False,
) -> None:
    """Run the retraining flow end to end with Prefect (no server to start).

    Steps: version the dataset with DVC (ingesting MNIST on first use) -> validate it with Great
    Expectations -> train the CNN, tracked in MLflow -> evaluate -> gate against the floors in
    params.yaml and against the champion re-scored on the same test set -> register and move the
    `champion` alias. A worse model never replaces the champion; the summary says why.

    With --deployment the same flow runs on a Prefect worker (see `digits deploy`); --set values
    are added to the deployment's default ones for this run.

    --set takes model.* and train.* keys; others (gate.*, data.* ...) can lower the bar or change
    the data, and need --allow-unsafe-overrides, here only: a deployment's runs never take them.
    Every override is recorded on the run and on the version it registers (`digits status`).
    """
    overrides = parse_sets(sets)
    check_overrides(overrides, deployment=on_deployment, allow_unsafe=allow_unsafe)
    if on_deployment:
        _retrain_on_deployment(overrides, wait, as_json)
        return
    settings, _ = load(overrides)  # bad params stop before any engine starts
    from flows.temporary_server import TemporaryPrefectServer, prefect_api

    # the two slow starts of a first run, side by side: a Prefect server boots in its own process while
    # this one imports the pipeline and creates the MLflow store
    server = TemporaryPrefectServer.start_unless_configured()
    from flows.retrain import retrain as retrain_flow

    _prepare_tracking_store(settings)
    with reported_errors(NOTHING_DONE), prefect_api(server) as api_url:
        if server is not None:
            typer.echo(f"Prefect API: a temporary server on {api_url}, stopped at exit", err=True)
        summary = retrain_flow(overrides=overrides, allow_unsafe_overrides=allow_unsafe)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))


def _prepare_tracking_store(settings: Settings) -> None:
    """Create the embedded MLflow store and experiment now (a new store's migrations take seconds).

    Best effort: the flow's first MLflow step connects again and reports any failure. A tracking
    server is left to that step, with its retries.
    """
    if settings.tracking_server:
        return
    from pipeline import registry

    try:
        registry.connect(settings)
    except Exception as err:
        logging.getLogger(__name__).debug("MLflow store not prepared ahead of the flow: %s", err)


def _retrain_on_deployment(overrides: dict[str, Any], wait: bool, as_json: bool) -> None:
    from app.summaries import render
    from flows import deployment
    from pipeline.settings import get_settings

    quiet_libraries()
    settings = get_settings()
    if overrides and settings.params_path.exists():
        load(overrides)  # the worker checks too; refuse what we can before a run
    with reported_errors():
        run = deployment.trigger(settings, overrides)
        url = deployment.ui_url(f"runs/flow-run/{run.id}")
        if not wait:
            started = {"flow_run_id": str(run.id), "flow_run_name": run.name, "url": url}
            typer.echo(json.dumps(started, indent=2) if as_json else f"started flow run {run.name} ({run.id}): {url or ''}")
            return
        typer.echo(f"flow run {run.name} of {deployment.full_name(settings.deployment)}: {url or run.id}", err=True)

        def say_state(r) -> None:
            typer.echo(f"  {r.state.name}" + (f": {r.state.message}" if r.state.message else ""), err=True)

        try:
            run = deployment.follow(
                run.id, on_state=say_state, on_hint=lambda hint: typer.secho(f"  {hint}", fg=typer.colors.YELLOW, err=True)
            )
        except KeyboardInterrupt:
            fail(f"stopped following flow run {run.name}; it goes on on the worker: {url or run.id}", 130)
        if not run.state.is_completed():
            fail(f"flow run {run.name} ended {run.state.name}: {run.state.message or 'no message'}. Its logs: {url or run.id}")
        summary = deployment.run_summary(run)
    typer.echo(json.dumps(summary, indent=2) if as_json else render(summary))


def _parse_grid(grid: list[str] | None) -> dict[str, list[Any]]:
    import yaml

    parsed: dict[str, list[Any]] = {}
    for item in grid or []:
        key, sep, value = item.partition("=")
        values = yaml.safe_load(value) if sep else None
        if not key or not isinstance(values, list):
            fail(f"--grid takes KEY=[V1,V2,...] with a model.* or train.* key, e.g. model.dense_units=[64,128]; got {item!r}", 2)
        parsed[key.strip()] = values
    return parsed


def sweep(
    sets: SetOption = None,
    grid: Annotated[
        list[str] | None,
        typer.Option(
            "--grid",
            help="Values to try for one key, replacing the grid in params.yaml: --grid model.dense_units=[64,128] (repeatable).",
        ),
    ] = None,
    dask_address: Annotated[
        str | None,
        typer.Option(
            "--dask-address",
            help="Dask scheduler to train on, e.g. tcp://10.0.0.5:8786 (default: DIGITS_DASK_ADDRESS, else a local cluster).",
        ),
    ] = None,
    as_json: JsonOption = False,
    allow_unsafe: UnsafeOption = False,
) -> None:
    """Train every combination of the grid in params.yaml (sweep.grid) in parallel, and gate the best.

    Steps: version and validate the dataset once -> train each candidate as a Prefect task on Dask
    (a local cluster, one worker per core; or the scheduler in --dask-address), each its own MLflow
    run nested under the sweep's run -> choose the best validation accuracy (the train.validation_split
    hold-out; the test set takes no part) -> test it, gate it and promote it exactly like `digits retrain`.
    --set changes what every candidate starts from; grid values win over it. As with `digits retrain`,
    keys outside model.*, train.* and sweep.* need --allow-unsafe-overrides.
    """
    overrides = parse_sets(sets)
    if grid:
        overrides["sweep.grid"] = _parse_grid(grid)
    check_overrides(overrides, deployment=False, allow_unsafe=allow_unsafe, sweep=True)
    _, params = load(overrides)  # bad keys or values stop before any cluster or engine
    if not params.sweep.grid:
        fail(
            "nothing to sweep: sweep.grid in params.yaml is empty. Give values to try, e.g.\n"
            "  digits sweep --grid model.dense_units=[64,128] --grid train.learning_rate=[0.001,0.002]\n"
            "or fill sweep.grid in params.yaml (`digits retrain` trains params.yaml as it is).",
            2,
        )
    from pipeline.params import grid_points

    points = grid_points(params)
    typer.echo(f"{len(points)} candidates: " + "; ".join(f"{p.name} {p.label}" for p in points), err=True)
    from flows.temporary_server import TemporaryPrefectServer

    server = TemporaryPrefectServer.start_unless_configured()  # boots while the flow's modules import
    with reported_errors(NOTHING_DONE):
        from flows.sweep import sweep as sweep_flow

        summary = sweep_flow(
            overrides=overrides, dask_address=dask_address, params=params, server=server, allow_unsafe_overrides=allow_unsafe
        )
    if as_json:  # the flow printed the summary already
        typer.echo(json.dumps(summary, indent=2))
