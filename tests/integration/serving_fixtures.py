"""Helpers for the serving tests: a throw-away MLflow store with trained champions, and a real
``bentoml serve`` process on a port it binds itself (port 0, read back).

Nothing here is mocked: models are trained with ``pipeline.train`` on real MNIST images, logged with
``mlflow.tensorflow.log_model`` like the retraining flow does, registered and promoted through
``pipeline.registry``; the server is the real BentoML service started as a subprocess.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from conftest import bound_port, stop_process_group

REPO = Path(__file__).resolve().parents[2]
SERVICE = "serving.service:DigitClassifier"
# `digits serve` as the project's CLI registers it: app.command()(serve)
CLI_SERVE = "import typer; from cli.serving import serve; app = typer.Typer(); app.command()(serve); app()"


# ---------------------------------------------------------------- a store with champions


def store_env(home: Path) -> dict[str, str]:
    """Environment variables that point the settings (and so MLflow) at a project folder ``home``."""
    return {
        "DIGITS_HOME": str(home),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "DO_NOT_TRACK": "1",
        "BENTOML_DO_NOT_TRACK": "true",
    }


@contextlib.contextmanager
def using_store(home: Path) -> Iterator[None]:
    """Point this process's settings at ``home`` (and its sqlite store) for the duration."""
    import pytest

    from pipeline.settings import get_settings

    with pytest.MonkeyPatch.context() as mp:
        for key, value in store_env(home).items():
            mp.setenv(key, value)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        get_settings.cache_clear()
        try:
            yield
        finally:
            get_settings.cache_clear()


# a small CNN: enough to read clear digits after a few seconds of training on the slice
# (its few dozen steps are averaged over the last ten or so, not a hundred; varying stroke widths
# pay off over 15 epochs of MNIST, and only slow down 3 epochs of a slice)
SMALL_MODEL = {"model.conv_filters": [16, 32], "model.dense_units": 64, "train.ema_momentum": 0.9, "model.augment_stroke": 0.0}
_trained: dict[tuple, tuple] = {}


def trained_model(dataset, seed: int = 42, epochs: int = 3):
    """A CNN trained with ``pipeline.train`` on ``dataset`` (once per session and seed): (model, accuracy)."""
    key = (id(dataset), seed, epochs)
    if key not in _trained:
        from pipeline.params import load_params
        from pipeline.preprocess import to_model_input
        from pipeline.train import compiled_predictor, train

        params = load_params(
            REPO / "params.yaml", {**SMALL_MODEL, "train.epochs": epochs, "train.seed": seed, "train.validation_split": 0.0}
        )
        model = train(dataset, params).model
        probabilities = compiled_predictor(model)(to_model_input(dataset.x_test))
        _trained[key] = (model, float((probabilities.argmax(1) == dataset.y_test).mean()))
    return _trained[key]


def log_model(model, dataset, accuracy: float, tflite: bool = True) -> tuple[str, str]:
    """Log a Keras model into the current store like the retraining flow does: (run_id, model_uri).

    With ``tflite`` the run also gets the checked float32 TensorFlow Lite export (not the int8 one, so
    that answers can be compared with the Keras model's probabilities), which the service then runs;
    without it the run looks like one from before exports, served through Keras.
    """
    import mlflow
    import mlflow.tensorflow
    from mlflow.models import infer_signature

    from pipeline import export, registry
    from pipeline.preprocess import to_model_input
    from pipeline.settings import get_settings
    from pipeline.train import compiled_predictor

    registry.connect(get_settings())
    example = to_model_input(dataset.x_test[:2])
    with mlflow.start_run() as run:
        mlflow.log_metrics({"test_accuracy": accuracy, "test_min_class_recall": 0.0})
        info = mlflow.tensorflow.log_model(
            model, name="model", input_example=example, signature=infer_signature(example, compiled_predictor(model)(example))
        )
        if tflite:
            checks = export.log_tflite_exports(model, dataset.x_test, compiled_predictor(model)(to_model_input(dataset.x_test)))
            assert checks["tflite"].ok, checks["tflite"].summary()
    return run.info.run_id, info.model_uri


def register_and_promote(run_id: str, model_uri: str, reason: str = "test") -> str:
    """Register the logged model as a new version and move ``champion`` to it; returns the version.

    The version gets what a gated promotion records (the verdict and its files' hashes), so the service loads it.
    """
    from pipeline import registry
    from pipeline.settings import get_settings

    settings = get_settings()
    client = registry.connect(settings)
    version = registry.register(client, settings.model_name, model_uri, run_id, {"data_version": "test-data"})
    registry.record_verdict(client, settings.model_name, version.version, registry.served_hashes(run_id, version.uri))
    current = registry.get_alias(client, settings.model_name)
    registry.move_champion(client, settings, version.version, current.version if current else None, reason, run_id)
    return version.version


# ---------------------------------------------------------------- a real server


@dataclass
class Server:
    """A ``bentoml serve`` subprocess (in its own process group, so that stopping it stops its workers)."""

    home: Path
    port: int = 0  # 0: the server binds a port of its own choosing, read back on first use of ``url``
    poll_seconds: float = 1.0
    via_cli: bool = False  # start it with `digits serve` (cli.serving.serve) instead of `bentoml serve`
    tracking_uri: str | None = None  # MLFLOW_TRACKING_URI for the service (a tracking server); None: home's sqlite store
    extra_env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        if self.port == 0:
            self.port = bound_port(self.process, "/livez")
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        env.update(store_env(self.home))
        if self.tracking_uri:
            env["MLFLOW_TRACKING_URI"] = self.tracking_uri
        env.update(
            {
                "DIGITS_CHAMPION_POLL_SECONDS": str(self.poll_seconds),
                "BENTOML_HOME": str(self.home / "bentoml"),
                "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                **self.extra_env,
            }
        )
        if self.log_path is None:
            self.log_path = self.home / f"server-{time.monotonic_ns()}.log"
        log = open(self.log_path, "wb")
        if self.via_cli:
            command = [sys.executable, "-c", CLI_SERVE, "--host", "127.0.0.1", "--port", str(self.port)]
        else:
            command = [
                sys.executable,
                "-m",
                "bentoml",
                "serve",
                SERVICE,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--working-dir",
                str(REPO),
            ]
        self.process = subprocess.Popen(
            command, cwd=self.home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def wait(self, path: str = "/readyz", timeout: float = 90.0) -> None:
        """Wait until ``path`` answers 200 (``/livez``: the process is up; ``/readyz``: a model is loaded)."""
        deadline = time.monotonic() + timeout
        if self.port == 0:
            try:
                self.port = bound_port(self.process, "/livez", timeout)
            except (RuntimeError, TimeoutError) as err:
                raise RuntimeError(f"{err}:\n{self.log()[-4000:]}") from None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.url}{path} not ready after {timeout:.0f} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------- images


def render(pixels: np.ndarray, fmt: str = "PNG", size: int = 300, dark_on_light: bool = True) -> bytes:
    """A real MNIST digit as a photo-like file: upscaled, optionally inverted (dark ink on white paper)."""
    from PIL import Image

    image = Image.fromarray(255 - pixels if dark_on_light else pixels).convert("L")
    image = image.resize((size, size), Image.Resampling.BICUBIC)
    if fmt == "JPEG":
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=90)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims ``width`` x ``height`` (a decompression bomb when large)."""
    import struct
    import zlib

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (8, 8), 255).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    header = bytearray(data[16:29])  # the IHDR chunk's data: width, height, depth, ...
    header[0:8] = struct.pack(">II", width, height)
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(header)))
    return bytes(data)
