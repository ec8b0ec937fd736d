"""``digits feedback`` and ``digits log``: the corrections people sent, their review, and the log's upkeep."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cli.common import JsonOption, fail, quiet_libraries, reported_errors

feedback = typer.Typer(
    help="Corrections received from the drawing page and POST /feedback; `digits feedback review` for the held ones.",
    invoke_without_command=True,
)


@feedback.callback()
def summary(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Corrections received from the drawing page and POST /feedback.

    Counts by true digit and by the model version that answered, each version's accuracy on the
    answers people corrected or confirmed, how many are ready to harvest into a new data version,
    and how many wait for review.
    """
    if ctx.invoked_subcommand is not None:
        return
    from app import feedback as corrections
    from pipeline.settings import get_settings

    quiet_libraries()
    with reported_errors():
        report = corrections.summary(get_settings())
    typer.echo(json.dumps(report, indent=2) if as_json else corrections.render(report))


@feedback.command("review")
def review(
    approve: Annotated[list[int] | None, typer.Option("--approve", help="Accept correction ID (repeatable).")] = None,
    reject: Annotated[list[int] | None, typer.Option("--reject", help="Reject correction ID (repeatable).")] = None,
    approve_all: Annotated[bool, typer.Option("--approve-all", help="Accept every correction waiting for review.")] = False,
    reject_all: Annotated[bool, typer.Option("--reject-all", help="Reject every correction waiting for review.")] = False,
    limit: Annotated[int, typer.Option(help="Show at most this many.", min=1)] = 20,
) -> None:
    """Corrections held for review, with the digit each one is about; accept or reject them.

    A correction is held when it contradicts an answer the model gave with high confidence, or when
    its sender has sent many corrections in a day (DIGITS_FEEDBACK_*). Held corrections never reach
    training until accepted here. Without options, lists them.
    """
    from app import feedback as corrections
    from pipeline.settings import get_settings

    if approve_all and reject_all:
        fail("--approve-all and --reject-all exclude each other", 2)
    quiet_libraries()
    settings = get_settings()
    with reported_errors():
        if approve or approve_all:
            typer.echo(f"accepted {corrections.review(settings, None if approve_all else approve, approve=True)}")
        if reject or reject_all:
            typer.echo(f"rejected {corrections.review(settings, None if reject_all else reject, approve=False)}")
        typer.echo(corrections.render_held(corrections.held(settings, limit)))


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
