"""``digits feedback`` and ``digits log``: the corrections people sent, and the prediction log's upkeep."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cli.common import JsonOption, quiet_libraries, reported_errors


def feedback(as_json: JsonOption = False) -> None:
    """Corrections received from the drawing page and POST /feedback.

    Counts by true digit and by the model version that answered, each version's accuracy on the
    answers people corrected or confirmed, and how many corrections are ready to harvest into a
    new data version.
    """
    from app import feedback as corrections
    from pipeline.settings import get_settings

    quiet_libraries()
    with reported_errors():
        report = corrections.summary(get_settings())
    typer.echo(json.dumps(report, indent=2) if as_json else corrections.render(report))


log = typer.Typer(help="The prediction log: every answer the service gave (default: logs/predictions.db).", no_args_is_help=True)


@log.command("prune")
def prune(
    days: Annotated[
        float | None,
        typer.Option(help="Keep this many days of answers; default: DIGITS_LOG_RETENTION_DAYS (30).", min=0),
    ] = None,
) -> None:
    """Delete answers older than the retention that nobody corrected (corrected ones are kept: they are training data)."""
    from app import feedback as corrections
    from pipeline.settings import get_settings

    quiet_libraries()
    with reported_errors():
        deleted, kept_days = corrections.prune(get_settings(), days)
    typer.echo(f"deleted {deleted:,} answers older than {kept_days:g} days")
