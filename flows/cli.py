"""``digits``: retrain, inspect and override the champion, manage data, open the UIs, predict."""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flows.temporary_server import TemporaryPrefectServer, TemporaryServerError
from serving import cli as serving_cli

if TYPE_CHECKING:
    from pipeline.settings import Settings

app = typer.Typer(
    help=(
        "Handwritten-digit MLOps: DVC data versions, Great Expectations checks, Keras training "
        "tracked in MLflow, a promotion gate, the MLflow Model Registry and a BentoML service.\n\n"
        "Typical use: `digits retrain` (trains and promotes if the gate passes), "
        "`digits status`, `digits ui`, `digits serve`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
data_app = typer.Typer(help="Ingest the raw dataset or add labelled images as a new data version.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@app.callback()
def _exit_without_final_garbage_collections() -> None:
    # At exit the interpreter's last garbage collections walk every object TensorFlow, Prefect and MLflow
    # made: 2-4 s of a retrain's end, freeing memory the OS takes back anyway. Objects frozen are skipped.
    # Registered before anything else, this runs after every other exit handler (Prefect's, MLflow's).
    atexit.register(gc.freeze)


def _setup_logging() -> None:
    """Progress lines on stderr for commands that run without Prefect."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    _quiet_libraries()


def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _parse_sets(sets: list[str] | None) -> dict[str, Any]:
    import yaml

    overrides: dict[str, Any] = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"--set takes KEY=VALUE with a dotted params.yaml key, e.g. train.epochs=3; got {item!r}", 2)
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def _quiet_libraries() -> None:
    """Defaults that make the embedded set-up calm and robust; an explicit environment wins."""
    for key, value in {
        "PREFECT_LOGGING_EXTRA_LOGGERS": "pipeline",  # our progress lines show in the Prefect run
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "GX_ANALYTICS_ENABLED": "false",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "DO_NOT_TRACK": "1",
        "DASK_LOGGING__DISTRIBUTED": "warning",  # a sweep's Dask cluster: problems only, not every connection
    }.items():
        os.environ.setdefault(key, value)
    logging.getLogger("pipeline").setLevel(logging.INFO)
    for noisy in ("alembic", "urllib3", "matplotlib", "PIL", "great_expectations", "mlflow", "dvc", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # a fresh clone has no cached data yet: pipeline.versioning says so in one line
    logging.getLogger("dvc_data").setLevel(logging.ERROR)


SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a params.yaml value for this run: --set train.epochs=3 (repeatable)."),
]


JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


@app.command()
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
) -> None:
    """Run the retraining flow end to end with Prefect (no server to start).

    Steps: version the dataset with DVC (ingesting MNIST on first use) -> validate it with Great
    Expectations -> train the CNN, tracked in MLflow -> evaluate -> gate against the floors in
    params.yaml and against the champion re-scored on the same test set -> register and move the
    `champion` alias. A worse model never replaces the champion; the summary says why.

    With --deployment the same flow runs on a Prefect worker (see `digits deploy`); --set values
    are added to the deployment's default ones for this run.
    """
    _quiet_libraries()
    from pipeline.params import ParamsError, load_params
    from pipeline.settings import get_settings

    overrides = _parse_sets(sets)
    if on_deployment:
        _retrain_on_deployment(overrides, wait, as_json)
        return
    settings = get_settings()
    try:
        load_params(settings.params_path, overrides)  # refuse bad params before starting any engine
    except ParamsError as err:
        _fail(str(err), 2)
    # the two slow starts of a first run, side by side: a Prefect server boots in its own process while
    # this one imports the pipeline and creates the MLflow store
    prefect_server = TemporaryPrefectServer.start_unless_configured()
    from flows.retrain import retrain as retrain_flow
    from pipeline.data import DataError
    from pipeline.validation import DataValidationError
    from pipeline.versioning import VersioningError

    _prepare_tracking_store(settings)
    try:
        with _prefect_api(prefect_server):
            summary = retrain_flow(overrides=overrides)
    except TemporaryServerError as err:
        _fail(f"{err}\nNothing was trained or promoted.")
    except ParamsError as err:
        _fail(str(err), 2)
    except DataValidationError as err:
        _fail(f"data validation failed; nothing was trained or promoted.\n{err}")
    except (DataError, VersioningError) as err:
        _fail(f"{err}\nNothing was trained or promoted.")
    if as_json:
        typer.echo(json.dumps(summary, indent=2))


@contextlib.contextmanager
def _prefect_api(server: TemporaryPrefectServer | None) -> Iterator[None]:
    """Run in here on the temporary Prefect server started ahead, once it answers; as is if none was started."""
    if server is None:
        yield
        return
    with server.api() as api_url:
        if api_url:  # None: a Prefect profile names a server, which Prefect uses
            typer.echo(f"Prefect API: a temporary server on {api_url}, stopped at exit", err=True)
        yield


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
    from flows import deployment
    from flows.retrain import render_summary
    from pipeline.params import ParamsError, load_params
    from pipeline.settings import get_settings

    settings = get_settings()
    try:
        if overrides and settings.params_path.exists():  # the worker checks too; refuse what we can before a run
            load_params(settings.params_path, overrides)
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
            _fail(f"stopped following flow run {run.name}; it goes on on the worker: {url or run.id}", 130)
        if not run.state.is_completed():
            _fail(f"flow run {run.name} ended {run.state.name}: {run.state.message or 'no message'}. Its logs: {url or run.id}")
        summary = deployment.run_summary(run)
    except ParamsError as err:
        _fail(str(err), 2)
    except deployment.DeploymentError as err:
        _fail(str(err))
    typer.echo(json.dumps(summary, indent=2) if as_json else render_summary(summary))


def _parse_grid(grid: list[str] | None) -> dict[str, list[Any]]:
    import yaml

    parsed: dict[str, list[Any]] = {}
    for item in grid or []:
        key, sep, value = item.partition("=")
        values = yaml.safe_load(value) if sep else None
        if not key or not isinstance(values, list):
            _fail(f"--grid takes KEY=[V1,V2,...] with a model.* or train.* key, e.g. model.dense_units=[64,128]; got {item!r}", 2)
        parsed[key.strip()] = values
    return parsed


@app.command()
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
) -> None:
    """Train every combination of the grid in params.yaml (sweep.grid) in parallel, and gate the best.

    Steps: version and validate the dataset once -> train each candidate as a Prefect task on Dask
    (a local cluster, one worker per core; or the scheduler in --dask-address), each its own MLflow
    run nested under the sweep's run -> choose the best validation accuracy (the train.validation_split
    hold-out; the test set takes no part) -> test it, gate it and promote it exactly like `digits retrain`.
    --set changes what every candidate starts from; grid values win over it.
    """
    _quiet_libraries()
    from pipeline.data import DataError
    from pipeline.params import ParamsError, load_params, sweep_candidates
    from pipeline.settings import get_settings
    from pipeline.validation import DataValidationError
    from pipeline.versioning import VersioningError

    overrides = _parse_sets(sets)
    if grid:
        overrides["sweep.grid"] = _parse_grid(grid)
    settings = get_settings()
    try:
        params = load_params(settings.params_path, overrides)  # bad keys or values stop before any cluster or engine
    except ParamsError as err:
        _fail(str(err), 2)
    if not params.sweep.grid:
        _fail(
            "nothing to sweep: sweep.grid in params.yaml is empty. Give values to try, e.g.\n"
            "  digits sweep --grid model.dense_units=[64,128] --grid train.learning_rate=[0.001,0.002]\n"
            "or fill sweep.grid in params.yaml (`digits retrain` trains params.yaml as it is).",
            2,
        )
    candidates = sweep_candidates(params)
    typer.echo(f"{len(candidates)} candidates: " + "; ".join(f"{c.name} {c.label}" for c in candidates), err=True)
    prefect_server = TemporaryPrefectServer.start_unless_configured()  # boots while the flow's modules import
    try:
        from flows.sweep import sweep as sweep_flow

        with _prefect_api(prefect_server):
            summary = sweep_flow(overrides=overrides, dask_address=dask_address)  # None: DIGITS_DASK_ADDRESS or a local cluster
    except TemporaryServerError as err:
        _fail(f"{err}\nNothing was trained or promoted.")
    except DataValidationError as err:
        _fail(f"data validation failed; nothing was trained or promoted.\n{err}")
    except (DataError, VersioningError) as err:
        _fail(f"{err}\nNothing was trained or promoted.")
    if as_json:  # the flow printed the summary already
        typer.echo(json.dumps(summary, indent=2))


@app.command()
def status(
    as_json: JsonOption = False,
    show_all: Annotated[bool, typer.Option("--all", help="List every registered version and the promotion history.")] = False,
) -> None:
    """Show the champion: model name, version, run id, test metrics, data version, promoted-at."""
    _quiet_libraries()
    from pipeline import registry
    from pipeline.settings import get_settings

    settings = get_settings()
    client = registry.connect(settings)
    champion = registry.get_alias(client, settings.model_name)
    report: dict[str, Any] = {"model_name": settings.model_name, "champion": champion.to_dict() if champion else None}
    previous = registry.get_alias(client, settings.model_name, registry.PREVIOUS)
    report["previous_champion"] = previous.version if previous else None
    if show_all:
        report["versions"] = [v.to_dict() for v in registry.list_versions(client, settings.model_name)]
        report["promotion_history"] = registry.promotion_history(client, settings.model_name)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    if champion is None:
        typer.echo(f"{settings.model_name}: no champion yet. Run `digits retrain` to train and promote one.")
        return
    typer.echo(f"{settings.model_name} champion: v{champion.version} (previous: {report['previous_champion'] or 'none'})")
    for key in ("run_id", "data_version", "git_commit", "promoted_at", "promoted_by", "promotion_reason"):
        typer.echo(f"  {key:<17} {getattr(champion, key)}")
    for key, value in champion.metrics.items():
        typer.echo(f"  {key:<17} {value:.4f}")
    for version in report.get("versions", []):
        typer.echo(
            f"  v{version['version']}: accuracy {version['metrics'].get('test_accuracy', float('nan')):.4f}, "
            f"data {str(version['data_version'])[:12]}, promoted {version['promoted_at'] or '-'}"
        )


def _manual_promotion(version: str | None, allow_regression: bool) -> None:
    _quiet_libraries()
    from pipeline import registry, steps
    from pipeline.data import DataError
    from pipeline.params import load_params
    from pipeline.settings import get_settings

    settings = get_settings()
    try:
        outcome = steps.promote_version(settings, load_params(settings.params_path), version, allow_regression)
    except (registry.PromotionError, DataError) as err:
        _fail(str(err))
    typer.echo(outcome.decision.to_markdown())
    if not outcome.decision.promote:
        _fail("the champion did not move", 1)
    typer.echo(f"champion is now v{outcome.champion.version}")


@app.command()
def promote(
    version: Annotated[str, typer.Argument(help="Registered version number to make champion.")],
    allow_regression: Annotated[bool, typer.Option(help="Promote even if less accurate than the current champion.")] = False,
) -> None:
    """Make a registered version the champion, through the same checks as the flow.

    The version is re-scored on the test set against the floors in params.yaml, compared with the
    current champion (skip with --allow-regression), and must load from the registry and answer.
    """
    _manual_promotion(version, allow_regression)


@app.command()
def rollback() -> None:
    """Move `champion` back to `previous-champion` (floors and smoke checks still apply)."""
    _manual_promotion(None, True)


@app.command()
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
    """Deploy the retraining flow to the Prefect server in PREFECT_API_URL, to run on workers.

    Creates (or updates) a process work pool, a concurrency limit of one on promotion across all
    workers, and the deployment retrain-digits/<name>: the flow from this code folder, run for the
    project in DIGITS_HOME, on a schedule, with --set values as default parameters. Then start a
    worker (`prefect worker start --pool digits`) and trigger runs with `digits retrain --deployment`,
    the Prefect UI or its API.
    """
    _quiet_libraries()
    from flows import deployment
    from flows.retrain import PROMOTION_TAG
    from pipeline.params import ParamsError, load_params
    from pipeline.settings import get_settings

    settings = get_settings()
    overrides = _parse_sets(sets)
    try:
        if overrides and settings.params_path.exists():
            load_params(settings.params_path, overrides)
        done = deployment.deploy(
            settings,
            pool=pool,
            name=name,
            cron=settings.retrain_cron if cron is None else cron,
            paused=paused,
            overrides=overrides,
        )
    except ParamsError as err:
        _fail(str(err), 2)
    except deployment.DeploymentError as err:
        _fail(str(err))
    schedule = f"{done.cron} (UTC){', paused' if done.paused else ''}" if done.cron else "none (runs start on demand)"
    typer.echo(f"work pool        {done.pool} (process, {'created' if done.pool_created else 'already there'})")
    typer.echo(f"promotion limit  tag {PROMOTION_TAG}: one promotion at a time across workers")
    typer.echo(f"deployment       {done.name}  {done.url or done.deployment_id}")
    typer.echo(f"  code           {done.source} ({deployment.ENTRYPOINT})")
    typer.echo(f"  project        {done.env['DIGITS_HOME']}")
    typer.echo(f"  schedule       {schedule}")
    typer.echo(f"  parameters     {json.dumps(done.parameters) if done.parameters else 'params.yaml as it is'}")
    typer.echo(
        f"\nStart a worker (keep it running; workers on more machines can share the pool):\n"
        f"    {deployment.worker_command(done.pool)}\n"
        "Then trigger a run: `digits retrain --deployment`, the Prefect UI, or "
        f"`prefect deployment run {done.name}`."
    )


# ---------------------------------------------------------------- single steps (dvc.yaml stages)


def _step_context(sets: list[str] | None = None):
    _setup_logging()
    from pipeline.params import ParamsError, load_params
    from pipeline.settings import get_settings

    settings = get_settings()
    try:
        return settings, load_params(settings.params_path, _parse_sets(sets))
    except ParamsError as err:
        _fail(str(err), 2)


@app.command()
def validate(sets: SetOption = None) -> None:
    """Validate data/ with Great Expectations; the HTML report goes to reports/validation/.

    Exits 1 naming every failed expectation with the offending values.
    """
    from pipeline import steps
    from pipeline.validation import DataValidationError

    settings, params = _step_context(sets)
    try:
        report = steps.validate(settings, params)
    except DataValidationError as err:
        _fail(str(err))
    typer.echo(report.summary())


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="Where to write the candidate (run id, model URI, test metrics) as JSON.")],
    sets: SetOption = None,
) -> None:
    """Train and evaluate one candidate, tracked in MLflow; no gate, no promotion (see `digits gate`)."""
    from pipeline import steps, versioning

    settings, params = _step_context(sets)
    pointer = versioning.read_pointer(versioning.pointer_path(settings.home, settings.data_dir))
    data_version = (
        versioning.DataVersion(pointer["md5"], int(pointer.get("nfiles", 0)), int(pointer.get("size", 0)), False)
        if pointer
        else versioning.record(settings.home, settings.data_dir, push=False)
    )
    run_id = steps.start_run(settings, params, data_version, run_name=f"train-{data_version.short}")
    try:
        candidate = steps.train_candidate(settings, params, run_id)
    except BaseException:
        steps.finish_run(settings, run_id, failed=True, stopped_at="training")
        raise
    steps.finish_run(settings, run_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(candidate.to_json())
    typer.echo(f"candidate run {run_id}: test accuracy {candidate.metrics.accuracy:.4f} -> {out}")


@app.command()
def gate(
    candidate_file: Annotated[Path, typer.Argument(help="JSON written by `digits train --out`.")],
    out: Annotated[Path | None, typer.Option(help="Where to write the gate decision as JSON.")] = None,
    sets: SetOption = None,
) -> None:
    """Gate a trained candidate (floors, champion re-scored, smoke check) and promote it if it passes."""
    from pipeline import steps

    settings, params = _step_context(sets)
    candidate = steps.Candidate.from_json(candidate_file.read_text())
    data_version = steps.run_data_version(settings, candidate.run_id)
    outcome = steps.promote(settings, candidate, steps.gate(settings, params, candidate), data_version)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(outcome.decision.to_dict(), indent=2))
    typer.echo(outcome.decision.to_markdown())


@data_app.command("ingest")
def data_ingest() -> None:
    """Write the raw MNIST under data/ from the source in params.yaml and record it with DVC."""
    _setup_logging()
    from pipeline import steps
    from pipeline.data import DataError
    from pipeline.params import load_params
    from pipeline.settings import get_settings

    settings = get_settings()
    try:
        version = steps.prepare_data(settings, load_params(settings.params_path))
    except DataError as err:
        _fail(str(err))
    typer.echo(f"data version {version.md5} ({version.files} files); commit data.dvc to share it")


@data_app.command("add")
def data_add(
    folder: Annotated[Path, typer.Argument(help="A folder with one sub-folder per digit, 0 ... 9, of PNG/JPEG images.")],
) -> None:
    """Add labelled images as a new data version that the next retrain trains on.

    Each image is normalised like MNIST (grayscale, polarity, crop, 20x20 box, centred by mass).
    Any unreadable image or unknown label stops the whole add: nothing is written.
    """
    _setup_logging()
    from pipeline import steps, versioning
    from pipeline.data import DataError, add_images
    from pipeline.params import load_params
    from pipeline.settings import get_settings

    settings = get_settings()
    try:
        steps.prepare_data(settings, load_params(settings.params_path))
        total = add_images(folder, settings.data_dir)
        version = versioning.record(settings.home, settings.data_dir)
    except DataError as err:
        _fail(str(err))
    typer.echo(
        f"added images ({total} added in all); new data version {version.md5}.\n"
        "Commit data.dvc (git add data.dvc && git commit) and run `digits retrain`."
    )


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
) -> None:
    """Open the MLflow UI on the embedded store: runs, plots, data versions, registry.

    With MLFLOW_TRACKING_URI set to a tracking server (http://...), nothing starts here: the
    server serves the UI, and this prints its address.
    """
    import subprocess

    from pipeline import registry
    from pipeline.settings import get_settings

    settings = get_settings()
    if settings.tracking_server:
        _tracking_server_ui(settings.tracking_server)
        return
    registry.connect(settings)
    typer.echo(f"MLflow UI on http://127.0.0.1:{port} (Ctrl-C to stop)")
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        settings.resolved_tracking_uri,
        "--workers",
        "1",
    ]
    if settings.artifact_location:
        command += ["--default-artifact-root", settings.artifact_location]
    raise typer.Exit(subprocess.call(command))


def _tracking_server_ui(url: str) -> None:
    """Point at the tracking server's own UI: it shows the shared store; nothing local would."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{url}/health", timeout=10).close()
    except urllib.error.HTTPError:
        pass  # it answered (perhaps asking for credentials): it is up
    except OSError as err:
        _fail(
            f"MLFLOW_TRACKING_URI points at the tracking server {url}, which does not answer ({err}). "
            "Start it (`mlflow server ...`), fix MLFLOW_TRACKING_URI, or unset it to use the embedded store."
        )
    typer.echo(
        f"The tracking server in MLFLOW_TRACKING_URI serves the MLflow UI: open {url}\n"
        "(runs, plots, data versions, the registry). Nothing was started here; unset MLFLOW_TRACKING_URI "
        "for the embedded store's UI."
    )


# serving commands live with the service; registered here so that `digits` is one tool
app.command()(serving_cli.predict)
app.command()(serving_cli.serve)
