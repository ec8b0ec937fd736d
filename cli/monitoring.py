"""``digits monitor``: is production drifting away from what the champion was made with?"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cli.common import JsonOption, fail, load, reported_errors


def monitor(
    window: Annotated[str, typer.Option(help="How far back to look: a number and m, h, d or w (30m, 24h, 7d).")] = "24h",
    as_json: JsonOption = False,
    retrain_when_needed: Annotated[
        bool,
        typer.Option(
            "--retrain-when-needed",
            help="When drift is found or monitor.min_feedback_to_retrain accepted corrections are ready: harvest them, "
            "then run the retraining flow (its run's tag trigger says drift or feedback).",
        ),
    ] = False,
) -> None:
    """Compare the answers of the last WINDOW in the prediction log with the champion's reference (a Prefect flow).

    The reference is the champion, as served, on a seeded sample of its validation hold-out. Checks, each
    with Evidently's drift tests and the thresholds of params.yaml's `monitor` section: the predicted digits,
    the confidence, the share of unsure answers, the input statistics (ink, box, centre, stroke width) and each
    version's accuracy on accepted corrections. With fewer answers than monitor.min_predictions it says so and
    claims no drift. Writes an HTML report under reports/monitoring/ and a run in the MLflow experiment
    digits-monitoring.
    """
    from pipeline.monitoring import WindowError, parse_window

    try:
        parse_window(window)
    except WindowError as err:
        fail(str(err), 2)
    load()  # bad params stop before the engine starts
    from flows.temporary_server import TemporaryPrefectServer, prefect_api

    server = TemporaryPrefectServer.start_unless_configured()
    from flows.monitor import monitor as monitor_flow

    with reported_errors("Nothing was monitored."), prefect_api(server):
        report = monitor_flow(window=window, retrain_when_needed=retrain_when_needed)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        from app.monitoring import render

        typer.echo(render(report))
        if retrain_when_needed and report["retrain"] is None:
            typer.echo("no retrain needed")
