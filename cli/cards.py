"""``digits card``: a registered version's model card, as an HTML file or in the browser."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import quiet_libraries, reported_errors


def card(
    version: Annotated[str | None, typer.Argument(help="Registered version number (default: the champion).")] = None,
    open_it: Annotated[bool, typer.Option("--open", help="Open the card in the web browser after writing it.")] = False,
    out: Annotated[
        Path | None, typer.Option(help="Where to write the HTML (default: reports/cards/<model>-v<version>.html).")
    ] = None,
) -> None:
    """Write a version's model card (HTML, with its figures) to a file and print its path.

    The card says what the model is, its data versions, params, metrics per class and beyond MNIST,
    calibration, the gate's decision and reasons, the git commit, how to retrain it, and its known
    limits with example mistakes. It is written at registration: the version's description in the
    MLflow registry holds its short form. A version registered before cards existed gets one now.
    """
    quiet_libraries()
    from app import cards
    from pipeline.settings import get_settings

    with reported_errors():
        path = cards.export(get_settings(), version, out)
    typer.echo(str(path))
    if open_it:
        import webbrowser

        if not webbrowser.open(path.resolve().as_uri()):
            typer.echo("no web browser to open it here: open the file above in one", err=True)
