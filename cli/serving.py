"""``digits predict`` (the champion in this process) and ``digits serve`` (the BentoML service)."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Annotated

import typer

from cli.common import fail

# the folder that holds the `serving` and `pipeline` packages (`bentoml serve --working-dir`)
ROOT = Path(__file__).resolve().parents[1]
SERVICE = "serving.service:DigitClassifier"


# what typer checks of every image file given to `digits predict`, as an argument or with --image
_IMAGE_FILE = dict(exists=True, dir_okay=False, readable=True, show_default=False)


def predict(
    images: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Image files of one handwritten digit each: PNG or JPEG photos, scans or drawings, "
            "dark-on-light or light-on-dark, any size.",
            **_IMAGE_FILE,
        ),
    ] = None,
    image: Annotated[
        list[Path] | None,
        typer.Option("--image", "-i", help="An image file (repeatable); the same as giving it as an argument.", **_IMAGE_FILE),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print one JSON object per line: file, digit, confidence, probabilities, model."),
    ] = False,
) -> None:
    """Print the digit in each image and its confidence, from the champion model.

    The champion (`models:/<name>@champion` in the MLflow registry) is loaded in this process:
    no server is needed. Each image gets the same MNIST-style normalisation as the training
    data. Exits with 1 if any image could not be read or shows no digit.
    """
    paths = [*(images or []), *(image or [])]
    if not paths:
        fail("give one or more image files: digits predict digit.png [more.jpg ...]", 2)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np

    from pipeline.preprocess import ImageError, image_bytes_to_mnist
    from pipeline.settings import get_settings
    from serving.champion import ModelUnavailable, load_champion

    digits, problems, answers = {}, {}, {}
    for path in paths:
        try:
            digits[path] = image_bytes_to_mnist(path.read_bytes())
        except (ImageError, OSError) as err:
            problems[path] = str(err)
    model = None
    if digits:
        try:
            model = load_champion(get_settings())
        except ModelUnavailable as err:
            fail(str(err))
        answers = dict(zip(digits, model.answers(np.stack(list(digits.values()))), strict=True))
    _print_answers(paths, answers, problems, as_json)
    if model is not None and not as_json:
        ref = model.ref
        typer.echo(f"answered by {ref.model_name} v{ref.version} (run {ref.run_id}, runtime {model.runtime})", err=True)
    if problems:
        raise typer.Exit(1)


def _print_answers(paths: list[Path], answers: dict[Path, dict], problems: dict[Path, str], as_json: bool) -> None:
    """Each file's answer, or why it has none, in the order given."""
    for path in paths:
        if path in problems:
            if as_json:
                typer.echo(json.dumps({"file": str(path), "error": problems[path]}))
            else:
                typer.secho(f"{path}: error: {problems[path]}", fg=typer.colors.RED, err=True)
            continue
        answer = answers[path]
        if as_json:
            typer.echo(json.dumps({"file": str(path), **answer}))
        else:
            typer.echo(f"{path}: {answer['digit']} ({answer['confidence']:.1%})")


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def serve(
    host: Annotated[
        str | None,
        typer.Option(help="Interface to listen on (default 127.0.0.1, or DIGITS_SERVE_HOST).", show_default=False),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(help="Port to listen on (default 3000, or DIGITS_SERVE_PORT; 0: any free port).", show_default=False),
    ] = None,
) -> None:
    """Serve the champion model over HTTP with BentoML (runs `bentoml serve`).

    The service answers with whatever `models:/<name>@champion` points to, and switches to a
    newly promoted version within DIGITS_CHAMPION_POLL_SECONDS (default 10) plus its load time,
    without failing requests. Until a model is promoted it answers 503 saying so.

    Open http://127.0.0.1:3000/draw to draw a digit; the API is described at
    http://127.0.0.1:3000/ and the champion at /model.
    """
    from cli.processes import run_server
    from pipeline.settings import get_settings

    settings = get_settings()
    host = host or settings.serve_host
    port = settings.serve_port if port is None else port
    if port and not _port_free(host, port):
        fail(f"{host}:{port} is in use (another `digits serve`?): choose another with --port", 2)
    env = {**os.environ, "DIGITS_HOME": str(settings.home.resolve())}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    shown = f"[{host}]" if ":" in host else host
    # with port 0 the server binds a free port itself (BentoML's own log line then still says 0)
    where = f"http://{shown}:{port}" if port else f"http://{shown} on a free port"
    typer.echo(
        f"serving models:/{settings.model_name}@champion on {where}  "
        f"(drawing pad: /draw, API: /, champion: /model; Ctrl+C stops)",
        err=True,
    )
    command = [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host, "--port", str(port), "--working-dir", str(ROOT)]
    # not exec'd: BentoML reloads its workers on SIGHUP, where a closed terminal means stop
    raise typer.Exit(run_server(command, env))
