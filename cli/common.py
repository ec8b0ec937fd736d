"""What every command shares: calm libraries, settings and params loaded once, one way to fail."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    from pipeline.params import Params
    from pipeline.settings import Settings

NOTHING_DONE = "Nothing was trained or promoted."

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a params.yaml value for this run: --set train.epochs=3 (repeatable)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
UnsafeOption = Annotated[
    bool,
    typer.Option(
        "--allow-unsafe-overrides",
        help="Let --set change more than model.* and train.* (gate.*, data.* ...) for this local run; "
        "recorded on the run and its version. Never allowed for runs on the deployment.",
    ),
]


def quiet_libraries() -> None:
    """Defaults that make the embedded set-up calm and robust; an explicit environment wins."""
    for key, value in {
        "PREFECT_LOGGING_EXTRA_LOGGERS": "pipeline,app",  # our progress lines show in the Prefect run
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "GX_ANALYTICS_ENABLED": "false",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "MLFLOW_LOGGING_LEVEL": "WARNING",  # MLflow sets its loggers' level when imported
        "DO_NOT_TRACK": "1",
        "DASK_LOGGING__DISTRIBUTED": "warning",  # a sweep's Dask cluster: problems only, not every connection
    }.items():
        os.environ.setdefault(key, value)
    for ours in ("pipeline", "app"):
        logging.getLogger(ours).setLevel(logging.INFO)
    for noisy in ("alembic", "urllib3", "matplotlib", "PIL", "great_expectations", "mlflow", "dvc", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def show_progress() -> None:
    """Progress lines on stderr, for commands that run without Prefect (which shows its own)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)


def fail(message: str, code: int = 1) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def parse_sets(sets: list[str] | None) -> dict[str, Any]:
    """``--set KEY=VALUE`` options as dotted params overrides, values read as YAML."""
    import yaml

    overrides: dict[str, Any] = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--set takes KEY=VALUE with a dotted params.yaml key, e.g. train.epochs=3; got {item!r}", 2)
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def check_overrides(overrides: dict[str, Any], deployment: bool, allow_unsafe: bool = False, sweep: bool = False) -> None:
    """Refuse overrides the run may not take (``pipeline.params.check_overrides``): exit 2 with the reason."""
    from pipeline.params import SAFE_OVERRIDE_SECTIONS, SWEEP_OVERRIDE_SECTIONS, OverrideRefused
    from pipeline.params import check_overrides as check

    try:
        check(overrides, deployment, allow_unsafe, SWEEP_OVERRIDE_SECTIONS if sweep else SAFE_OVERRIDE_SECTIONS)
    except OverrideRefused as err:
        fail(f"{err}\n{NOTHING_DONE}", 2)


def load(overrides: dict[str, Any] | None = None, progress: bool = False) -> tuple[Settings, Params]:
    """Settings and params.yaml with ``overrides``, read once per command; bad params exit 2 before any work."""
    quiet_libraries()
    if progress:
        show_progress()
    from pipeline.params import load_params
    from pipeline.settings import get_settings

    settings = get_settings()
    with reported_errors():
        return settings, load_params(settings.params_path, overrides)


@contextmanager
def reported_errors(consequence: str = "") -> Iterator[None]:
    """The errors a command expects become a message and an exit code (2 for bad params, else 1).

    ``consequence`` is added to the message, e.g. that nothing was trained. Anything else is a bug
    and keeps its traceback.
    """
    try:
        yield
    except Exception as err:
        described = _describe(err)
        if described is None:
            raise
        code, message = described
        fail(f"{message}\n{consequence}".strip(), code)


def _describe(err: Exception) -> tuple[int, str] | None:
    """The exit code and message for an error a command expects; None for any other."""
    # imported now that an error is here: a command that succeeds never pays for these imports
    from app.reproduce import ReproduceError
    from app.trace import TraceError
    from flows.deployment import DeploymentError
    from flows.temporary_server import TemporaryServerError
    from pipeline.data import DataError
    from pipeline.params import ParamsError
    from pipeline.prediction_log import PredictionLogError
    from pipeline.preprocess import ImageError
    from pipeline.registry import PromotionError
    from pipeline.validation import DataValidationError
    from pipeline.versioning import VersioningError

    if isinstance(err, ParamsError):
        return 2, str(err)
    if isinstance(err, DataValidationError):
        return 1, f"data validation failed.\n{err}"
    expected = (
        DataError,
        VersioningError,
        PromotionError,
        DeploymentError,
        TemporaryServerError,
        ImageError,
        PredictionLogError,
        ReproduceError,
        TraceError,
    )
    if isinstance(err, expected):
        return 1, str(err)
    return None
