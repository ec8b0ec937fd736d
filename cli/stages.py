"""``digits validate``, ``train`` and ``gate``: the retrain flow's steps one at a time, as dvc.yaml's stages run them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import SetOption, load, parse_sets, reported_errors


def validate(sets: SetOption = None) -> None:
    """Validate data/ with Great Expectations; the HTML report goes to reports/validation/.

    Exits 1 naming every failed expectation with the offending values.
    """
    from app import data

    settings, params = load(parse_sets(sets), progress=True)
    with reported_errors():
        report = data.validate(settings, params)
    typer.echo(report.summary())


def train(
    out: Annotated[Path, typer.Option(help="Where to write the candidate (run id, model URI, test metrics) as JSON.")],
    sets: SetOption = None,
) -> None:
    """Train and evaluate one candidate, tracked in MLflow; no gate, no promotion (see `digits gate`)."""
    from app import stages

    settings, params = load(parse_sets(sets), progress=True)
    candidate = stages.train(settings, params, out)
    typer.echo(f"candidate run {candidate.run_id}: test accuracy {candidate.metrics.accuracy:.4f} -> {out}")


def gate(
    candidate_file: Annotated[Path, typer.Argument(help="JSON written by `digits train --out`.")],
    out: Annotated[Path | None, typer.Option(help="Where to write the gate decision as JSON.")] = None,
    sets: SetOption = None,
) -> None:
    """Gate a trained candidate (floors, champion re-scored, smoke check) and promote it if it passes."""
    from app import stages

    settings, params = load(parse_sets(sets), progress=True)
    outcome = stages.gate_and_promote(settings, params, candidate_file, out)
    typer.echo(outcome.decision.to_markdown())
