"""``digits data``: ingest the raw dataset, or add labelled images as a new data version."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import JsonOption, load, reported_errors

data = typer.Typer(help="Ingest the raw dataset or add labelled images as a new data version.", no_args_is_help=True)


@data.command("ingest")
def ingest() -> None:
    """Write the raw MNIST under data/ from the source in params.yaml and record it with DVC."""
    from app import data as datasets

    settings, params = load(progress=True)
    with reported_errors():
        version = datasets.prepare(settings, params)
    typer.echo(f"data version {version.md5} ({version.files} files); commit data.dvc to share it")


@data.command("add")
def add(
    folder: Annotated[Path, typer.Argument(help="A folder with one sub-folder per digit, 0 ... 9, of PNG/JPEG images.")],
) -> None:
    """Add labelled images as a new data version that the next retrain trains on.

    Each image is normalised like MNIST (grayscale, polarity, crop, 20x20 box, centred by mass).
    Any unreadable image or unknown label stops the whole add: nothing is written.
    """
    from app import data as datasets

    settings, params = load(progress=True)
    with reported_errors():
        total, version = datasets.add(settings, params, folder)
    typer.echo(
        f"added images ({total} added in all); new data version {version.md5}.\n"
        "Commit data.dvc (git add data.dvc && git commit) and run `digits retrain`."
    )


@data.command("harvest")
def harvest(as_json: JsonOption = False) -> None:
    """Turn accepted corrections from the prediction log into a new data version (a Prefect flow).

    Images and labels go under data/feedback/, split by each image's content hash into
    feedback-train (trained on, weighted by feedback.train_weight) and feedback-test (scored by the
    gate beside MNIST), so an image never lands in both. The dataset is validated first; with
    nothing new, no version is made. Held corrections wait for `digits feedback review`.
    """
    import json

    load()  # bad params stop before the engine starts
    from flows.temporary_server import TemporaryPrefectServer, prefect_api

    server = TemporaryPrefectServer.start_unless_configured()
    from flows.harvest import harvest as harvest_flow

    with reported_errors("Nothing was harvested."), prefect_api(server):
        report = harvest_flow()
    if as_json:
        typer.echo(json.dumps(report, indent=2))
