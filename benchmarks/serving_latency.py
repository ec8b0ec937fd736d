"""Serving latency and throughput: our BentoML service against a naive one, its peers and the model in-process.

Run from the project folder:

    .venv/bin/python benchmarks/serving_latency.py [--quick] [--no-pin] [--home DIR] [--compare-int8-softmax]
        [--rounds N [--together]]

The same model (the champion of the project's store, or of ``--home``; when there is none, the default
architecture of ``params.yaml`` trained here for one epoch into a temporary store: latency does not
depend on accuracy) answers the same real MNIST test images these ways, one after the other:

* ``in-process``   -- the model called in a Python process, no HTTP, timed per call: its TensorFlow Lite
                      exports through LiteRT (``tflite-int8``, ``tflite``), ``compiled_predictor`` and
                      Keras ``model.predict``;
* ``ours``         -- ``bentoml serve serving.service:DigitClassifier`` as it runs by default: the int8
                      export when the champion's run kept one, else float32, else Keras; every answer
                      recorded in the prediction log;
* ``ours-nolog``   -- the same service with ``DIGITS_LOG_ENABLED=false``: what the prediction log costs;
* ``ours-shadow``  -- the same service with a challenger in the shadows (a copy of the champion registered as
                      another version, under the ``challenger`` alias): what running it after each answer
                      costs the champion's answers; only with a model trained here (``--fresh-model``);
* ``ours-float32`` / ``ours-keras`` -- the same service with ``DIGITS_SERVE_RUNTIME=tflite`` / ``keras``;
* ``naive``        -- ``benchmarks/naive_service.py``, ``model.predict`` per request: the ratios' baseline;
* ``bentoml-documented`` -- a peer: ``benchmarks/documented_service.py``, BentoML written the documented way
                      (``@bentoml.api(batchable=True)``, adaptive batching) over the same TensorFlow Lite export;
* ``mlflow-serve`` -- a peer: ``mlflow models serve -m models:/<name>@champion --env-manager local``, MLflow's
                      scoring server over the model's pyfunc flavour, on ``/invocations``.

Ours is compared with each peer in the same run (``peers`` in the JSON): throughput at ``--clients`` clients
and p99 at 100 requests/s, the goal being to stay ahead of both with the prediction log on.

Each of our services writes its prediction log to a SQLite file of its own in the benchmark's temporary
folder (``DIGITS_LOG_DB_URL``), never into a project's log; ``/model`` says afterwards how many answers
were written, dropped (queue full) and failed.

``--compare-int8-softmax`` trains a model into a temporary store (as ``--fresh-model`` does) and logs it
twice: once with the int8 export as it was built before its softmax ran in float (every op in int8, the
softmax too: probabilities in steps of 1/256; no calibration), served first as the champion and measured
as ``ours-int8-softmax`` (with its export in-process as ``tflite-int8-softmax``); once as the project logs
it now (``log_tflite_exports`` and the calibration's temperature), to which the champion then moves for
``ours`` and the services of ``--services``.

The harness's load client drives each server on 127.0.0.1: an open loop at fixed rates of single
images (latency from each request's scheduled send, so a stalled server cannot hide; a service is not
driven above the first rate it could not keep), then a closed loop of ``--clients`` clients with
single images and with batches of ``--batch``: peak throughput. Every answer is checked (status, one
prediction per image, the in-process model's digit). By default the server's processes run on the
first CPU and this process on the second (``--no-pin``: both share every CPU). Nothing asserts: it
prints tables, ratios and the same-run comparisons (``ours`` over ``ours-nolog``; ``ours`` over
``ours-int8-softmax``) against their targets, and writes JSON.

``--rounds N`` measures the services N times, in turn (every other round in the reverse order), and reports
each load's median round: one round's throughput varies by several per cent from one run to the next, more
than a same-run target of 5 % allows. A same-run comparison of throughput then takes the median of the rounds'
ratios (each round's two services ran one after the other, on the same stretch of the machine); an open
loop's p99 is taken over the latencies of all rounds together. ``--together`` starts the services once and
keeps them running side by side (only the one measured has load): a round's services are then measured
seconds apart, by the same processes every round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NoReturn

import harness
import numpy as np
from harness import ROOT, Load, LoadClient, Server, fmt, say, table

from pipeline.data import Dataset, has_dataset, ingest, load_dataset
from pipeline.params import load_params
from pipeline.registry import ModelRef
from pipeline.settings import get_settings

OUTPUT = harness.RESULTS / "serving_latency.json"
# name -> (bentoml service target, --working-dir, extra environment)
SERVICES = {
    "ours": ("serving.service:DigitClassifier", ROOT, {"DIGITS_SERVE_RUNTIME": "tflite-int8"}),
    "ours-nolog": (
        "serving.service:DigitClassifier",
        ROOT,
        {"DIGITS_SERVE_RUNTIME": "tflite-int8", "DIGITS_LOG_ENABLED": "false"},
    ),
    "ours-float32": ("serving.service:DigitClassifier", ROOT, {"DIGITS_SERVE_RUNTIME": "tflite"}),
    "ours-keras": ("serving.service:DigitClassifier", ROOT, {"DIGITS_SERVE_RUNTIME": "keras"}),
    "naive": ("naive_service:NaiveDigitClassifier", ROOT / "benchmarks", {}),
    # the same service with a challenger in the shadows (a copy of the champion, registered as another version)
    "ours-shadow": ("serving.service:DigitClassifier", ROOT, {"DIGITS_SERVE_RUNTIME": "tflite-int8"}),
    # only with --compare-int8-softmax, whose champion is then the same model with the int8 export as it was built before
    "ours-int8-softmax": ("serving.service:DigitClassifier", ROOT, {"DIGITS_SERVE_RUNTIME": "tflite-int8"}),
    # peers: what a user of this stack would pick instead of our service
    "bentoml-documented": ("documented_service:DocumentedDigitClassifier", ROOT / "benchmarks", {}),
    "mlflow-serve": (None, ROOT, {}),  # not BentoML: `mlflow models serve` (MLFLOW_SERVE)
}
# the peers, each measured against ours (throughput at --clients clients, p99 at TARGET_RATE): ours is to stay ahead
PEERS = ("bentoml-documented", "mlflow-serve")
# how a service takes images, where, and when it is ready: (encoding, route, ready path); the rest: ("pixels", ...)
PROTOCOLS = {
    # a batchable endpoint concatenates requests along the first axis: a single image goes as a batch of one
    "bentoml-documented": ("pixels-batch", "/predict_pixels", "/readyz"),
    # MLflow's scoring server: the model's own input, normalised (n, 28, 28, 1), as {"inputs": ...}
    "mlflow-serve": ("mlflow", "/invocations", "/health"),
}
DEFAULT_PROTOCOL = ("pixels", "/predict_pixels", "/readyz")
INT8_SOFTMAX = "ours-int8-softmax"
SHADOW = "ours-shadow"
# our services, and the in-process method each calls for a request
OURS = {
    "ours": "tflite-int8",
    "ours-nolog": "tflite-int8",
    "ours-float32": "tflite",
    "ours-keras": "compiled_predictor",
    INT8_SOFTMAX: "tflite-int8-softmax",
    SHADOW: "tflite-int8",
}
METHODS = ("tflite-int8", "tflite-int8-softmax", "tflite", "compiled_predictor", "model.predict")
RATES = (10, 25, 50, 100, 200, 400)
CLIENTS = 32
BATCH = 64
TARGET_RATE = 100
TARGET_P99_MS = 10.0
TARGET_THROUGHPUT_RATIO = 10.0
# same-run comparisons: key -> (service, its baseline, the largest share slower allowed, the loads the target covers
# among "single" and "batch" (throughput of the closed loop) and "p99" (at TARGET_RATE), what the issue asks)
SAME_RUN = {
    "prediction_log": (
        "ours",
        "ours-nolog",
        0.05,
        ("single", "batch", "p99"),
        "throughput at 32 clients and p99 at 100 requests/s within 5 %",
    ),
    "shadow_challenger": (
        SHADOW,
        "ours",
        None,
        ("single", "batch", "p99"),
        "what a challenger in the shadows costs the champion's answers (no target: the figures are reported)",
    ),
    "float_probabilities": (
        "ours",
        INT8_SOFTMAX,
        0.10,
        ("single", "p99"),
        "throughput (32 clients, single images) and p99 at 100 requests/s with float probabilities: no more than 10 % slower",
    ),
}
# an open-loop rate a service did not keep: any error, fewer answers than offered, or a backlog this long
SATURATED_P99_S = 1.0


@dataclass
class LoadResult:
    service: str
    load: str  # "open" (fixed rate) or "closed" (concurrent clients)
    images_per_request: int
    offered_rate: float | None  # requests/s on the schedule (open loop)
    clients: int | None  # concurrent clients (closed loop)
    seconds: float  # the measuring window
    requests: int  # requests measured (open loop: scheduled; closed loop: started in the window)
    ok: int
    errors: dict[str, int]  # "HTTP 503", "timeout", "ClientOSError", "bad answer", ... -> count
    requests_per_second: float  # 200 answers per second
    images_per_second: float
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    mean_ms: float | None
    send_lag_max_ms: float | None = None  # open loop: how late the generator itself sent a request
    differing_answers: int = 0  # images whose digit differs from the in-process model's
    differing_samples: list[dict] = field(default_factory=list)
    model_versions: list[str] = field(default_factory=list)
    server_cpu_seconds: float | None = None  # CPU time of the server's processes in the window
    client_cpu_seconds: float = 0.0  # CPU time of this process (the load generator) in the window
    # closed loops of a service with the prediction log: its writer thread's own CPU an answer, over this load
    log_writer_us: float | None = None
    saturated: bool = False
    error_samples: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list, repr=False)  # seconds; pooled across rounds, not written

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def log_writer_share(self) -> float | None:
        """The log's writer's CPU an answer over the server's CPU an image in this load: what the log takes
        from the service's core, measured in one process at one time (unlike a ratio of two servers' loads)."""
        if not (self.log_writer_us and self.server_cpu_seconds and self.ok):
            return None
        return round(self.log_writer_us / (self.server_cpu_seconds / (self.ok * self.images_per_request) * 1e6), 4)


# ---------------------------------------------------------------- requests and their answers


@dataclass
class Workload:
    """Pre-encoded request bodies: request k holds images [k*n, (k+1)*n) of the image pool."""

    images_per_request: int
    bodies: list[bytes]

    @classmethod
    def of(cls, pool: np.ndarray, n: int, encoding: str = "pixels") -> Workload:
        """``encoding``: "pixels" (one image as (28, 28)), "pixels-batch" (always (n, 28, 28)) or "mlflow"
        (``{"inputs": ...}``, the model's normalised input)."""
        from pipeline.preprocess import to_model_input

        single = n == 1 and encoding == "pixels"
        pixels = [pool[k * n] if single else pool[k * n : (k + 1) * n] for k in range(len(pool) // n)]  # one image: (28, 28)
        if encoding == "mlflow":
            content = [{"inputs": np.round(to_model_input(p), 6).tolist()} for p in pixels]
        else:
            content = [{"pixels": p.tolist()} for p in pixels]
        return cls(n, [json.dumps(c, separators=(",", ":")).encode() for c in content])


class Answers:
    """The harness's check of each answer: one prediction per image with a digit and a model version;
    counts the digits unlike the in-process model's, with evidence for a few."""

    def __init__(self, expected: np.ndarray, workload: Workload, version_served: str | None = None) -> None:
        self.expected, self.workload = expected, workload
        self.differing, self.samples, self.versions = 0, [], set()
        self.version_served = version_served  # answers that do not name a version (MLflow's): the version the server loaded

    def __call__(self, request: int, answers: object) -> str | None:
        if self.version_served is not None:  # MLflow's {"predictions": probabilities}: digits, and the version it loaded
            try:
                rows = np.asarray(answers["predictions"], dtype=np.float64)  # type: ignore[index]
                version = self.version_served
                answers = [{"digit": int(r.argmax()), "confidence": float(r.max()), "model_version": version} for r in rows]
            except (TypeError, KeyError, ValueError):
                return f"no predictions in {str(answers)[:200]}"
        n = self.workload.images_per_request
        if not isinstance(answers, list):
            return f"not a list: {str(answers)[:100]}"
        if len(answers) != n:
            return f"{len(answers)} predictions for {n} images"
        try:
            digits = np.array([a["digit"] for a in answers])
            self.versions.add(str(answers[0]["model_version"]))
        except (TypeError, KeyError):
            return f"no digit/model_version in {str(answers)[:200]}"
        first = request % len(self.workload.bodies) * n
        wrong = np.flatnonzero(digits != self.expected[first : first + n])
        self.differing += len(wrong)
        if len(wrong) and len(self.samples) < 5:  # near ties (low confidence), or another image's answers
            best = max(range(len(self.expected) - n + 1), key=lambda o: int((self.expected[o : o + n] == digits).sum()))
            self.samples.append(
                {
                    "first_image": first,
                    "images": n,
                    "differing": len(wrong),
                    "confidence_of_differing": [answers[i].get("confidence") for i in wrong[:8]],
                    "best_matching_offset": best,
                    "matches_at_best_offset": int((self.expected[best : best + n] == digits).sum()),
                    "run_id": answers[0].get("run_id"),
                }
            )
        return None


_Answers = Answers


def load_result(service: str, kind: str, load: Load, answers: Answers, **extra: object) -> LoadResult:
    """One loop's figures: the harness's counts and latencies, and what the answers said."""
    n, ok, window = answers.workload.images_per_request, load.ok, load.seconds
    return LoadResult(
        service=service,
        load=kind,
        images_per_request=n,
        seconds=round(window, 3),
        requests=load.requests,
        ok=ok,
        errors=dict(load.errors),
        requests_per_second=round(ok / window, 2),
        images_per_second=round(ok * n / window, 1),
        **harness.latency_ms(load.latencies),
        send_lag_max_ms=round(max(load.lags) * 1000, 3) if load.lags else None,
        differing_answers=answers.differing,
        differing_samples=answers.samples,
        model_versions=sorted(answers.versions),
        server_cpu_seconds=None if load.server_cpu_seconds is None else round(load.server_cpu_seconds, 3),
        client_cpu_seconds=round(load.client_cpu_seconds, 3),
        error_samples=load.error_samples,
        latencies=list(load.latencies),
        **extra,
    )


# ---------------------------------------------------------------- the model


@dataclass
class Models:
    """The versions measured: the champion, and with ``--compare-int8-softmax`` the same model with the int8
    export as it was built before (``old``), which ``ours-int8-softmax`` serves."""

    ref: ModelRef
    old: ModelRef | None
    note: str  # where they come from
    checks: dict = field(default_factory=dict)  # what the checks of the exports said (a model trained here)
    trained_here: bool = False  # in a temporary store, which the benchmark may change

    def version_of(self, service: str) -> str:
        return self.old.version if service == INT8_SOFTMAX and self.old else self.ref.version

    def to_dict(self) -> dict:
        found = {"uri": self.ref.uri, "version": self.ref.version, "run_id": self.ref.run_id, "source": self.note}
        if self.old:
            found["int8_softmax"] = {"uri": self.old.uri, "version": self.old.version, "run_id": self.old.run_id}
        return {**found, "checks": self.checks}


def store_env(base: dict[str, str], home: Path, keep_tracking_uri: bool) -> dict[str, str]:
    """The environment of the servers and the in-process child: ``base`` (this process's environment
    before MLflow touched it), pointed at the store of ``home``."""
    env = {k: v for k, v in base.items() if keep_tracking_uri or k != "MLFLOW_TRACKING_URI"}
    # PYTHONPATH: the naive service is imported from benchmarks/, and needs the project as well
    pythonpath = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(DIGITS_HOME=str(home), TF_CPP_MIN_LOG_LEVEL="2", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    env.update(DO_NOT_TRACK="1", BENTOML_DO_NOT_TRACK="true", PYTHONPATH=pythonpath)
    return env


def use_store(home: Path, keep_tracking_uri: bool = True) -> None:
    # (mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI: servers get a snapshot taken before)
    os.environ["DIGITS_HOME"] = str(home)
    if not keep_tracking_uri:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    get_settings.cache_clear()


def champion_of(home: Path) -> ModelRef | None:
    """The champion of the store at ``home`` (or of MLFLOW_TRACKING_URI), None when there is none."""
    from pipeline.registry import get_alias, store_client
    from serving.champion import missing_store

    use_store(home)
    settings = get_settings()
    if missing_store(settings):
        return None
    return get_alias(store_client(settings), settings.model_name)


def int8_softmax_export(model, calibration: np.ndarray) -> bytes:
    """The int8 export as the project built it before its softmax ran in float: full-integer quantisation of
    every op, the softmax too, so that probabilities come in steps of 1/256. ``calibration``: normalised
    images, the representative dataset ``pipeline.export.to_tflite`` uses."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([image[None]] for image in calibration)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]  # fails rather than leave an op in float
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return converter.convert()


def log_int8_export(content: bytes, images: np.ndarray, probabilities: np.ndarray) -> dict:
    """Log an int8 export into the active run as ``log_tflite_exports`` logs one (its file, its check, the
    ``serving_runtime`` tag), so that the service runs it; kept whatever its check says, since only its speed
    is measured. Returns the check."""
    import mlflow

    from pipeline import export
    from pipeline.preprocess import to_model_input

    answers = export.tflite_predictor(content)(to_model_input(images))
    check = export.agreement(probabilities, answers, probability_limit=None).to_dict()
    mlflow.log_dict(check, f"{export.TFLITE_ARTIFACT_DIR}/{export.AGREEMENT_FILES['tflite-int8']}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, export.INT8_FILE)
        path.write_bytes(content)
        mlflow.log_artifact(str(path), export.TFLITE_ARTIFACT_DIR)
    mlflow.set_tag("serving_runtime", "tflite-int8")
    return {**check, "probabilities_in_steps_of_1_256": bool(np.allclose(answers * 256, np.round(answers * 256), atol=1e-3))}


def log_calibration(model, dataset: Dataset, params) -> float:
    """Fit the temperature and unsure threshold on the validation hold-out training left out, and log them
    where the service reads them, as training does; returns the temperature."""
    import mlflow

    from pipeline import export
    from pipeline.calibration import fit_calibration
    from pipeline.evaluate import predict_classes
    from pipeline.train import compiled_predictor, split_for_validation

    *_, x_val, y_val = split_for_validation(dataset.x_train, dataset.y_train, params.train.validation_split, params.train.seed)
    calibration = fit_calibration(predict_classes(compiled_predictor(model), x_val)[0], y_val, params.confidence)
    mlflow.log_dict(calibration.to_dict(), f"{export.TFLITE_ARTIFACT_DIR}/{export.CALIBRATION_FILE}")
    return calibration.temperature


def log_and_register(
    model, dataset: Dataset, probabilities: np.ndarray, accuracy: float, params, int8_softmax: bool, compared: bool = False
):
    """Log the model into a new run and register it as the retraining flow does: (the version, what its exports'
    checks said). Its exports and calibration are the project's; with ``int8_softmax``, only the int8 export as
    it was built before (``int8_softmax_export``), uncalibrated."""
    import mlflow
    import mlflow.tensorflow
    from mlflow.models import infer_signature

    from pipeline import export, registry
    from pipeline.preprocess import to_model_input

    settings = get_settings()
    client = registry.connect(settings)
    example = to_model_input(dataset.x_test[:2])
    # stated, as the flow states them: inferring them re-imports the model in a subprocess
    requirements = [f"{n}=={v}" for n, v in harness.package_versions("tensorflow-cpu", "keras", "numpy", "mlflow").items()]
    calibration = dataset.x_train[: export.CALIBRATION_IMAGES]
    with mlflow.start_run(run_name="serving-benchmark-int8-softmax" if int8_softmax else "serving-benchmark") as run:
        mlflow.log_metrics({"test_accuracy": accuracy})
        signature = infer_signature(example, probabilities[:2])
        info = mlflow.tensorflow.log_model(
            model, name="model", signature=signature, input_example=example, pip_requirements=requirements
        )
        if int8_softmax:
            content = int8_softmax_export(model, to_model_input(calibration))
            checks = {"tflite-int8": log_int8_export(content, dataset.x_test, probabilities)}
        else:  # the service runs them
            agreements = export.log_tflite_exports(model, dataset.x_test, probabilities, calibration=calibration)
            checks = {runtime: check.to_dict() for runtime, check in agreements.items()}
            if compared and not agreements["tflite-int8"].ok:  # the comparison is of two int8 exports' speed
                content = export.to_tflite(model, calibration=to_model_input(calibration))
                checks["tflite-int8"] = {
                    **log_int8_export(content, dataset.x_test, probabilities),
                    "kept_for_the_comparison": True,
                }
            checks["temperature"] = log_calibration(model, dataset, params)
    run_id = run.info.run_id
    version = registry.register(client, settings.model_name, info.model_uri, run_id, {"data_version": "serving-benchmark"})
    return version, checks


def promote(ref: ModelRef, previous: ModelRef | None, reason: str) -> None:
    """Move the champion of the store this process uses from ``previous`` to ``ref``."""
    from pipeline import registry

    settings = get_settings()
    client = registry.store_client(settings)
    # the benchmark's versions were gated when the pipeline promoted them: recorded as such, so the service loads them
    registry.record_verdict(client, settings.model_name, ref.version, registry.served_hashes(ref.run_id, ref.uri))
    registry.move_champion(client, settings, ref.version, previous.version if previous else None, reason, ref.run_id)


def shadow_challenger(ref: ModelRef | None) -> ModelRef | None:
    """With a ``ref``: register a copy of it as another version and make that the challenger; with None: no challenger."""
    from pipeline import registry

    settings = get_settings()
    client = registry.store_client(settings)
    if ref is None:
        return registry.set_challenger(client, settings, None)
    source = client.get_model_version(settings.model_name, ref.version).source
    copy = registry.register(client, settings.model_name, source, ref.run_id, {"data_version": "serving-benchmark"})
    return registry.set_challenger(client, settings, copy.version)


def train_temporary_champion(store: Path, dataset: Dataset, int8_softmax: bool):
    """Train the default architecture of params.yaml for 1 epoch, log, register and promote it as the
    retraining flow does, in a throw-away store: (champion, the old int8 version or None, test accuracy,
    training images, what the runs' checks said). With ``int8_softmax`` the same model is first logged and
    registered with the int8 export as it was built before, and that version is the champion until
    ``promote`` moves the alias to the other."""
    import keras

    from pipeline.preprocess import to_model_input
    from pipeline.train import compiled_predictor, train

    use_store(store, keep_tracking_uri=False)
    keras.utils.disable_interactive_logging()
    params = load_params(ROOT / "params.yaml", {"train.epochs": 1})
    model = train(dataset, params).model
    probabilities = compiled_predictor(model)(to_model_input(dataset.x_test))
    accuracy = float((probabilities.argmax(1) == dataset.y_test).mean())
    checks, old = {}, None
    if int8_softmax:
        old, checks["int8_softmax"] = log_and_register(model, dataset, probabilities, accuracy, params, int8_softmax=True)
    ref, checks["project"] = log_and_register(
        model, dataset, probabilities, accuracy, params, int8_softmax=False, compared=int8_softmax
    )
    promote(old or ref, None, "serving benchmark: trained for it, 1 epoch")
    return ref, old, accuracy, len(dataset.x_train), checks


def choose_model(args: argparse.Namespace, base_env: dict[str, str], dataset: Dataset, tmp: Path) -> tuple[Models, dict]:
    """(the versions to measure, the servers' environment): the store's champion, or a model trained here
    (always with ``--compare-int8-softmax``)."""
    home = (args.home or Path(os.environ.get("DIGITS_HOME") or ROOT)).resolve()
    if base_env.get("MLFLOW_TRACKING_URI"):  # said without machine paths: the JSON may be committed
        where = "the tracking server in MLFLOW_TRACKING_URI"
    else:
        where = "the project's store (mlflow/)" if home == ROOT else "the store of DIGITS_HOME"
    ref = None if args.fresh_model or args.compare_int8_softmax else champion_of(home)
    if ref is not None:
        return Models(ref, None, f"the champion of {where}"), store_env(base_env, home, keep_tracking_uri=True)
    why = " (--compare-int8-softmax)" if args.compare_int8_softmax else (" (--fresh-model)" if args.fresh_model else "")
    say(f"no champion in {where}{why}: training the default architecture of params.yaml for 1 epoch into a temporary store")
    (tmp / "store").mkdir()
    training = dataset.head(10_000) if args.quick else dataset
    ref, old, accuracy, n_train, checks = train_temporary_champion(tmp / "store", training, args.compare_int8_softmax)
    note = (
        f"no champion: the default architecture of params.yaml trained for 1 epoch on {n_train:,} images "
        f"(test accuracy {accuracy:.2%}) into a temporary store; latency does not depend on accuracy"
    )
    if old is not None:
        note += (
            f"; logged twice: v{old.version} with the int8 export as it was built before (softmax in int8, no "
            f"calibration), v{ref.version} as the project logs it now (softmax in float, calibration)"
        )
    return Models(ref, old, note, checks, trained_here=True), store_env(base_env, tmp / "store", keep_tracking_uri=False)


# ---------------------------------------------------------------- in-process baseline (a child process)


def in_process_calls(quick: bool, batch: int, int8_softmax: bool) -> dict[str, dict[str, int]]:
    """Timed calls per method and images per call (fewer of ``model.predict``, much the slowest); the old
    int8 export only with ``int8_softmax``."""
    fast, slow = ((200, 50), (20, 10)) if quick else ((2000, 500), (300, 100))
    methods = [m for m in METHODS if int8_softmax or m != OURS[INT8_SOFTMAX]]
    return {m: dict(zip(("1", str(batch)), slow if m == "model.predict" else fast, strict=True)) for m in methods}


def time_calls(call, pool: np.ndarray, n: int, calls: int) -> dict:
    """Per-call latency of ``call`` on slices of ``n`` images, after three warm calls (traces, allocations)."""
    inputs = [pool[k : k + n] for k in range(0, len(pool) - n + 1, n)]
    for x in inputs[:3]:
        call(x)
    times = []
    for i in range(calls):
        started = time.perf_counter()
        call(inputs[i % len(inputs)])
        times.append(time.perf_counter() - started)
    total = sum(times)
    speed = {"calls_per_second": round(calls / total, 1), "images_per_second": round(calls * n / total, 1)}
    return {"images_per_call": n, "calls": calls, **harness.latency_ms(times), **speed}


def in_process_main(spec: dict) -> dict:
    """Time the model called in this process, per call, on the benchmark's images (run as a child)."""
    from pipeline.export import INT8_FILE, RUNTIME_FILES, tflite_predictor
    from pipeline.model import limit_threads
    from pipeline.preprocess import to_model_input
    from pipeline.registry import load_keras, load_tflite, store_client
    from pipeline.train import compiled_predictor

    settings = get_settings()
    store_client(settings)  # MLflow reads the store of DIGITS_HOME (or MLFLOW_TRACKING_URI), as the service does
    limit_threads(settings.serve_tf_threads)  # the same TensorFlow threads as the service
    model = load_keras(spec["uri"])
    predictor = compiled_predictor(model)
    pool = load_dataset(ROOT / "data").x_test[: spec["pool"]]
    digits = predictor(to_model_input(pool)).argmax(1)
    methods = {"compiled_predictor": predictor, "model.predict": lambda x: model.predict(x, verbose=0)}
    for runtime, file in RUNTIME_FILES.items():  # what the service runs when the run has them
        if (content := load_tflite(spec["run_id"], file)) is not None:
            methods[runtime] = tflite_predictor(content, settings.serve_tf_threads)
    if spec.get("int8_softmax_run_id"):  # --compare-int8-softmax: the same model's int8 export as it was built before
        content = load_tflite(spec["int8_softmax_run_id"], INT8_FILE)
        methods[OURS[INT8_SOFTMAX]] = tflite_predictor(content, settings.serve_tf_threads)
    results = []
    for method, calls_by_size in spec["calls"].items():
        if method not in methods:
            say(f"  in-process {method}: the run has no TensorFlow Lite export; skipped")
            continue
        for size, calls in calls_by_size.items():
            call = lambda x, fn=methods[method]: np.argmax(fn(to_model_input(x)), axis=1)
            results.append(r := {"method": method, **time_calls(call, pool, int(size), calls)})
            say(f"  in-process {method:<18} {size:>3} image(s)/call: p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms")
    return {"results": results, "digits": digits.tolist(), "tf_threads": settings.serve_tf_threads}


def run_child(spec: str) -> NoReturn:
    """The ``--in-process`` child: its figures as JSON on stdout, progress on stderr."""
    code = 1
    try:
        print(json.dumps(in_process_main(json.loads(spec))), flush=True)
        code = 0
    except Exception:
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)  # TensorFlow's teardown can take minutes on a busy machine; nothing is left to do


def run_in_process(spec: dict, env: dict[str, str], cpus: set[int] | None) -> dict:
    """The in-process baseline in a fresh process: same CPU and TensorFlow threads as the server."""
    command = [sys.executable, str(Path(__file__).resolve()), "--in-process", json.dumps(spec)]
    done = subprocess.run(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, preexec_fn=harness.pinned(cpus), timeout=1800
    )
    if done.returncode != 0:
        raise RuntimeError(f"the in-process baseline failed (exit {done.returncode}); see its output above")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- measuring the services


def progress(r: LoadResult) -> None:
    what = f"{r.offered_rate:g} req/s" if r.load == "open" else f"{r.clients} clients"
    say(
        f"  {r.service:<17} {r.load:<6} {what:>10} x{r.images_per_request:<3} {r.requests_per_second:8.1f} req/s "
        f"p50 {fmt(r.p50_ms, '.1f')} ms p99 {fmt(r.p99_ms, '.1f')} ms errors {r.error_count}"
        f"{'  (saturated)' if r.saturated else ''}"
    )


async def open_run(name: str, client: LoadClient, server: Server, answers: Answers, rate: float, seconds: float) -> LoadResult:
    load = await client.open_loop(answers.workload.bodies, rate, seconds, check=answers, server=server)
    result = load_result(name, "open", load, answers, offered_rate=rate, clients=None)
    backlog = result.p99_ms is not None and result.p99_ms > SATURATED_P99_S * 1000
    result.saturated = result.error_count > 0 or result.ok < 0.9 * load.requests or backlog
    return result


async def measure_service(
    name: str, server: Server, expected: np.ndarray, workloads: list[Workload], args, version_served: str | None = None
) -> dict:
    """Sequential warm-ups, the open loop at each rate up to the first it cannot keep, the closed loops.
    ``version_served``: the version a server whose answers do not name one (MLflow's) has loaded."""
    route = PROTOCOLS.get(name, DEFAULT_PROTOCOL)[1]

    def Answers(expected: np.ndarray, workload: Workload) -> _Answers:  # noqa: N802
        return _Answers(expected, workload, version_served)

    async with LoadClient(server.url + route, args.timeout, max(256, 2 * args.clients)) as client:
        warm = [Answers(expected, w) for w in workloads]  # first-call costs, a trace per batch size
        warm_loads = [await client.closed_loop(a.workload.bodies, 1, 20 * args.timeout, requests=20, check=a) for a in warm]
        settled = [round(await server.settle(), 1)]  # seconds until the server was idle, before each load
        runs: list[LoadResult] = []
        skipped: list[float] = []
        for rate in args.rates:
            if runs and runs[-1].saturated:
                skipped.append(rate)
                continue
            runs.append(await open_run(name, client, server, Answers(expected, workloads[0]), rate, args.seconds))
            progress(runs[-1])
            settled.append(round(await server.settle(), 1))
        for workload in workloads:
            answers = Answers(expected, workload)
            writer_before = log_writer(server)
            load = await client.closed_loop(
                workload.bodies, args.clients, args.seconds, args.warmup, check=answers, server=server
            )
            runs.append(load_result(name, "closed", load, answers, offered_rate=None, clients=args.clients))
            settled.append(round(await server.settle(), 1))
            if writer_before and (writer_after := log_writer(server)) and writer_after[1] > writer_before[1]:
                cpu, written = writer_after[0] - writer_before[0], writer_after[1] - writer_before[1]
                runs[-1].log_writer_us = round(cpu / written * 1e6, 2)
            progress(runs[-1])
    return {
        "warm_up_errors": dict(sum((Counter({f"warm-up {k}": v for k, v in w.errors.items()}) for w in warm_loads), Counter())),
        "warm_up_error_samples": [f"warm-up {s}" for w in warm_loads for s in w.error_samples][:5],
        "model_versions": sorted(set().union(*(a.versions for a in warm))),
        "runs": runs,
        "skipped_rates": skipped,
        "settle_seconds": settled[:-1],
    }


def served_model(server: Server, timeout: float = 30.0) -> dict:
    """What ``/model`` says once the prediction log has written what it queued (or after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while (model := harness.get_json(server.url + "/model") or {}).get("prediction_log", {}).get("queued"):
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return model


def log_writer(server: Server) -> tuple[float, int] | None:
    """(the CPU seconds of the service's log writer, the answers it wrote) once its queue is written; None
    for a service without a log."""
    written = served_model(server).get("prediction_log") or {}
    return (written["cpu_seconds"], written["written"]) if "cpu_seconds" in written else None


def mlflow_serve(port: int) -> list[str]:
    """`mlflow models serve` of the champion, as MLflow documents it for a registered model: its own scoring
    server (uvicorn), the model's pyfunc flavour (Keras here), this environment (no new one built)."""
    model = f"models:/{get_settings().model_name}@champion"
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", model, "--env-manager", "local"] + [
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1")
    ]


@contextlib.contextmanager
def started(name: str, args, env: dict[str, str], tmp: Path, cpus) -> Iterator[Server]:
    """One service running until the block ends (``harness.ServerNotReady`` if it does not come up)."""
    target, workdir, extra_env = SERVICES[name]
    if target is None:  # mlflow-serve
        command, what = mlflow_serve, f"`mlflow models serve -m models:/{get_settings().model_name}@champion`"
    else:
        bentoml = [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1", "--working-dir", str(workdir)]
        command, what = (lambda port: [*bentoml, "--port", str(port)]), f"`bentoml serve {target}`"
    say(f"{name}: starting {what}")
    server_env = {**env, **extra_env, "BENTOML_HOME": str(tmp / "bentoml")}
    if target is None:  # MLflow reads the registry of the chosen store itself, and starts uvicorn from PATH
        server_env["MLFLOW_TRACKING_URI"] = get_settings().resolved_tracking_uri
        server_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), server_env.get("PATH", "")])
    if name in OURS:  # a log of its own, thrown away with the folder: benchmark traffic never lands in a real one
        server_env["DIGITS_LOG_DB_URL"] = f"sqlite:///{tmp / f'{name}-predictions.db'}"
    with harness.serve(
        command,
        name=f"{name}: {what}",
        env=server_env,
        log_path=tmp / f"{name}.log",
        cpus=cpus,
        ready_path=PROTOCOLS.get(name, DEFAULT_PROTOCOL)[2],
        ready_timeout=args.ready_timeout,
        binds_port_zero=target is not None,  # `mlflow models serve` drops a port of 0 and listens on 8000
    ) as server:
        pins = pins_of(server)
        where = f"{server.url}; {pins['processes']} process(es) on CPU(s) {pins['cpus']}"
        say(f"{name}: ready in {server.ready_seconds:.1f} s on {where}")
        yield server


def pins_of(server: Server) -> dict:
    """How many processes the server runs, and on which CPUs."""
    affinities = server.affinities()
    return {"processes": len(affinities), "cpus": sorted({c for v in affinities.values() for c in v})}


def measure_running(name: str, server: Server, args, expected: np.ndarray, workloads: list[Workload], tmp: Path, version: str):
    """A running service measured: (its figures, the CPUs its processes ran on). ``version``: the champion's,
    which a server whose answers do not name their version has loaded."""

    def scrub(text: str) -> str:  # without this machine's paths: the JSON may be committed
        return text.replace(str(tmp), "<tmp>").replace(str(ROOT), ".")

    pins = pins_of(server)
    served = version if SERVICES[name][0] is None else None
    result = asyncio.run(measure_service(name, server, expected, workloads, args, served))
    result["ready_seconds"] = round(server.ready_seconds, 1)
    model = served_model(server)  # {}: the naive service
    result["runtime"] = model.get("runtime")
    if written := model.get("prediction_log"):
        result["prediction_log"] = {**written, "database": scrub(written["database"])}
        say(log_line(name, written))
    if any(r.error_count for r in result["runs"]) or result["warm_up_errors"]:
        result["server_log_tail"] = scrub(server.log_tail(60))
    return result, pins


def not_ready(err: harness.ServerNotReady, tmp: Path) -> dict:
    """The figures of a service that did not come up: none (the other services are measured all the same)."""
    failed = str(err).replace(str(tmp), "<tmp>").replace(str(ROOT), ".")
    say(failed)
    return {"failed": failed, "runs": [], "warm_up_errors": {}, "model_versions": [], "skipped_rates": []}


def measure_one(
    name: str, args, env: dict[str, str], expected: np.ndarray, workloads: list[Workload], tmp: Path, cpus, version: str
):
    """One service started, measured and stopped: (its figures, the CPUs its processes ran on or None)."""
    try:
        with started(name, args, env, tmp, cpus) as server:
            return measure_running(name, server, args, expected, workloads, tmp, version)
    except harness.ServerNotReady as err:
        return not_ready(err, tmp), None


def load_name(run: LoadResult) -> str:
    return f"open {run.offered_rate:g}/s" if run.load == "open" else f"closed x{run.images_per_request}"


def median_of_rounds(results: list[dict]) -> dict:
    """A service measured in several rounds as one: for a closed loop, the round with the median throughput; for
    an open loop, the latencies of all rounds pooled (a p99 over five times the requests is far steadier than
    any one round's). Every round's figures stay in ``rounds``, and the errors of all rounds count."""
    measured = [result for result in results if result["runs"]]
    if len(results) == 1 or not measured:
        return results[0]

    def same_load(run: LoadResult) -> list[LoadResult]:
        key = (run.load, run.images_per_request, run.offered_rate)
        return [r for result in measured for r in result["runs"] if (r.load, r.images_per_request, r.offered_rate) == key]

    def figure(run: LoadResult) -> float:
        if run.load == "closed":
            return run.images_per_second
        return run.p99_ms if run.p99_ms is not None else float("inf")

    runs = []
    for run in measured[0]["runs"]:
        rounds = sorted(same_load(run), key=figure)
        median = replace(rounds[len(rounds) // 2])
        median.errors = dict(sum((Counter(r.errors) for r in rounds), Counter()))  # an error in any round counts
        if run.load == "open":
            pooled = [seconds for r in rounds for seconds in r.latencies]
            counts = {"requests": sum(r.requests for r in rounds), "ok": sum(r.ok for r in rounds)}
            median = replace(median, **harness.latency_ms(pooled), **counts, latencies=pooled)
        runs.append(median)
    return {
        **measured[-1],
        "runs": runs,
        "warm_up_errors": dict(sum((Counter(result["warm_up_errors"]) for result in results), Counter())),
        "failed_rounds": [result["failed"] for result in results if "failed" in result],
        "rounds": [
            {load_name(r): figure(r) for r in result["runs"]}
            | {f"{load_name(r)} log writer share": r.log_writer_share for r in result["runs"] if r.log_writer_share}
            for result in measured
        ],
    }


# ---------------------------------------------------------------- ratios and report


def ratio(a: float | None, b: float | None, digits: int = 2) -> float | None:
    return round(a / b, digits) if a is not None and b else None


def find(runs: list[LoadResult], load: str, images: int, rate: float | None = None) -> LoadResult | None:
    matching = (r for r in runs if r.load == load and r.images_per_request == images and (rate is None or r.offered_rate == rate))
    return next(matching, None)


def throughput_ratios(ours: list[LoadResult], naive: list[LoadResult], batch: int) -> dict:
    out = {}
    for images, key in ((1, "single"), (batch, f"batch_{batch}")):
        o, n = find(ours, "closed", images), find(naive, "closed", images)
        out[key] = {
            "ours_images_per_second": o.images_per_second if o else None,
            "naive_images_per_second": n.images_per_second if n else None,
            "ours_over_naive": ratio(o.images_per_second, n.images_per_second) if o and n else None,
            "ours_p99_ms": o.p99_ms if o else None,
            "naive_p99_ms": n.p99_ms if n else None,
            "errors": {"ours": o.error_count if o else None, "naive": n.error_count if n else None},
        }
    return out


def latency_ratios(ours: list[LoadResult], naive: list[LoadResult], same: dict | None, predict: dict | None) -> dict:
    """p99 at each rate against naive's and against the in-process model (same runtime, ``model.predict``)."""
    out = {}
    for o in (r for r in ours if r.load == "open"):
        n = find(naive, "open", 1, o.offered_rate)
        note = None if n else ("not run: it saturated at a lower rate" if naive else "not measured")
        if n is not None and n.saturated:
            note = f"saturated ({n.error_count} errors, {n.requests_per_second:.1f} of {n.offered_rate:g} req/s answered)"
        out[f"{o.offered_rate:g}"] = {
            "ours_p99_ms": o.p99_ms,
            "ours_errors": o.error_count,
            "ours_saturated": o.saturated,
            "naive_p99_ms": n.p99_ms if n else None,
            "naive_note": note,
            "naive_over_ours": ratio(n.p99_ms, o.p99_ms) if n and not n.saturated else None,
            "ours_over_in_process_same_runtime": ratio(o.p99_ms, same["p99_ms"]) if same else None,
            "ours_over_in_process_model_predict": ratio(o.p99_ms, predict["p99_ms"]) if predict else None,
        }
    return out


def targets(ratios: dict, ours: list[LoadResult], warm_up_errors: dict) -> dict[str, bool | None]:
    at = ratios["p99_at_rate"].get(f"{TARGET_RATE:g}")
    p99_met = None if not at or at["ours_p99_ms"] is None else (at["ours_p99_ms"] <= TARGET_P99_MS and at["ours_errors"] == 0)
    found = {f"p99_at_{TARGET_RATE}_rps_le_{TARGET_P99_MS:g}_ms": p99_met}
    for key, x in ratios["throughput"].items():
        met = None if x["ours_over_naive"] is None else x["ours_over_naive"] >= TARGET_THROUGHPUT_RATIO
        found[f"throughput_{key}_ge_{TARGET_THROUGHPUT_RATIO:g}x_naive"] = met
    found["zero_errors"] = None if not ours else (sum(r.error_count for r in ours) == 0 and not warm_up_errors)
    return found


def compare(services: dict[str, dict], in_process: list[dict], batch: int) -> dict:
    """Each of our services (by runtime) against naive and against its own model in-process."""
    local = {(r["method"], r["images_per_call"]): r for r in in_process}
    naive = services.get("naive", {}).get("runs", [])
    out = {}
    for name in (n for n in OURS if n in services):
        ours = services[name]["runs"]
        out[name] = {
            "throughput": throughput_ratios(ours, naive, batch),
            "p99_at_rate": latency_ratios(ours, naive, local.get((OURS[name], 1)), local.get(("model.predict", 1))),
            "in_process_method": OURS[name],
        }
        out[name]["targets"] = targets(out[name], ours, services[name]["warm_up_errors"])
    return out


def same_run(services: dict[str, dict], batch: int) -> dict:
    """Each comparison of SAME_RUN whose two services were measured: both figures, their ratio, the target."""
    out = {}
    for key, (name, base, slower, covered, _) in SAME_RUN.items():
        if not (services.get(name, {}).get("runs") and services.get(base, {}).get("runs")):
            continue
        mine, theirs = services[name]["runs"], services[base]["runs"]
        loads = {
            "single": ("images_per_second", lambda runs: find(runs, "closed", 1), "closed x1"),
            "batch": ("images_per_second", lambda runs: find(runs, "closed", batch), f"closed x{batch}"),
            "p99": ("p99_ms", lambda runs: find(runs, "open", 1, TARGET_RATE), None),  # pooled over the rounds already
        }
        rows, met = {}, []
        for load, (figure, pick, round_key) in loads.items():
            a, b = pick(mine), pick(theirs)
            x, y = getattr(a, figure, None), getattr(b, figure, None)
            errors = {name: getattr(a, "error_count", None), base: getattr(b, "error_count", None)}
            rows[load] = {figure: {name: x, base: y}, f"{name}_over_{base}": ratio(x, y, 3), "errors": errors}
            # with rounds, the median of each round's ratio: the two services measured one after the other
            # share that stretch of the machine, so the ratio varies less than either figure
            paired = round_ratios(services[name].get("rounds"), services[base].get("rounds"), round_key) if round_key else None
            if paired:
                rows[load] |= {"round_ratios": paired, f"{name}_over_{base}": statistics.median(paired)}
            # against a baseline without a log: what the log's writer took of the service's CPU, measured inside
            # the one server (median of the rounds)
            share_key = f"{round_key} log writer share"
            shares = [r[share_key] for r in services[name].get("rounds") or [] if round_key and share_key in r]
            if (shares or getattr(a, "log_writer_share", None)) and not getattr(b, "log_writer_share", None):
                rows[load]["log_writer_share"] = statistics.median(shares) if shares else a.log_writer_share
            if load not in covered or slower is None:
                continue
            judged = rows[load][f"{name}_over_{base}"]
            if judged is None:  # not measured (a closed loop none of whose requests started in its window: 0)
                met.append(None)
            else:  # a higher throughput, a lower p99
                within = judged <= 1 + slower if figure == "p99_ms" else judged >= 1 - slower
                met.append(within and not any(errors.values()))
        runtimes = {name: services[name].get("runtime"), base: services[base].get("runtime")}
        out[key] = {
            "service": name,
            "baseline": base,
            "runtimes": runtimes,
            "loads": rows,
            # two runtimes (an export its check did not keep): not the comparison the target is about
            "target_met": None if not met or None in met or len(set(runtimes.values())) > 1 else all(met),
        }
    return out


def round_ratios(mine: list[dict] | None, theirs: list[dict] | None, key: str) -> list[float]:
    """Each round's figure of one service over the other's, when both ran the same rounds."""
    if not mine or not theirs or len(mine) != len(theirs) or len(mine) < 2:
        return []
    pairs = [(a.get(key), b.get(key)) for a, b in zip(mine, theirs, strict=True)]
    return [round(a / b, 3) for a, b in pairs if a is not None and b]


def peers(services: dict[str, dict], batch: int) -> dict:
    """Ours against each peer measured in the same run: throughput of the closed loops (single images and batches),
    p99 at TARGET_RATE. Ours is ahead when it answers more images a second and its p99 is lower, or the peer could
    not keep the rate at all, with no errors of its own."""
    out = {}
    ours = services.get("ours", {}).get("runs")
    for peer in (p for p in PEERS if services.get(p, {}).get("runs") and ours):
        theirs = services[peer]["runs"]
        rows, ahead = {}, []
        for load, images in (("single", 1), ("batch", batch)):
            a, b = find(ours, "closed", images), find(theirs, "closed", images)
            x, y = getattr(a, "images_per_second", None), getattr(b, "images_per_second", None)
            rows[load] = {
                "images_per_second": {"ours": x, peer: y},
                f"ours_over_{peer}": ratio(x, y, 3),
                "errors": {"ours": getattr(a, "error_count", None), peer: getattr(b, "error_count", None)},
            }
            ahead.append(None if x is None or y is None else x >= y and not a.error_count)
        a, b = find(ours, "open", 1, TARGET_RATE), find(theirs, "open", 1, TARGET_RATE)
        x = getattr(a, "p99_ms", None)
        kept = b is not None and not b.saturated
        note = None if kept else ("saturated at a lower rate: not run" if b is None else "could not keep the rate")
        rows["p99"] = {
            "p99_ms": {"ours": x, peer: getattr(b, "p99_ms", None)},
            f"{peer}_over_ours": ratio(b.p99_ms, x, 3) if kept and x else None,
            f"{peer}_note": note,
            "errors": {"ours": getattr(a, "error_count", None), peer: getattr(b, "error_count", None)},
        }
        if a is None or x is None:
            ahead.append(None)
        else:
            ahead.append(not a.saturated and not a.error_count and (not kept or x <= b.p99_ms))
        out[peer] = {"loads": rows, "ours_ahead": None if None in ahead else all(ahead)}
    return out


def print_peers(compared: dict, batch: int, clients: int) -> None:
    for peer, c in compared.items():
        for load, label in (("single", "single images"), ("batch", f"batches of {batch}")):
            row = c["loads"][load]
            values = row["images_per_second"]
            print(
                f"peer {peer}: peak throughput, {clients} clients, {label}: ours {fmt(values['ours'], ',.0f')} img/s, "
                f"{peer} {fmt(values[peer], ',.1f')} img/s -> ours/{peer} {fmt(row[f'ours_over_{peer}'], '.2f')}x "
                f"(errors {row['errors']['ours']}, {row['errors'][peer]})"
            )
        row = c["loads"]["p99"]
        values = row["p99_ms"]
        theirs = fmt(values[peer], ".2f") + " ms" + (f" [{row[f'{peer}_note']}]" if row[f"{peer}_note"] else "")
        print(
            f"peer {peer}: p99 at {TARGET_RATE:g} req/s: ours {fmt(values['ours'], '.2f')} ms, {peer} {theirs}"
            f" -> {peer}/ours {fmt(row[f'{peer}_over_ours'], '.1f')}x"
        )
        met = "not measured" if c["ours_ahead"] is None else ("met" if c["ours_ahead"] else "NOT met")
        print(f"target ours ahead of {peer} (throughput at {clients} clients and p99 at {TARGET_RATE:g} req/s): {met}")


def answering(service: dict) -> list[str]:
    """The model versions that answered a service's requests, warm-up included."""
    return sorted(set(service["model_versions"]).union(*(r.model_versions for r in service["runs"])))


LOAD_COLUMNS = [
    *[("service", "<17"), ("load", "<18"), ("img/req", ">7"), ("req/s", ">8,.1f"), ("img/s", ">8,.0f"), ("p50 ms", ">8.2f")],
    *[("p99 ms", ">8.2f"), ("max ms", ">8.1f"), ("errors", ">6"), ("srv CPU", ">7.0%"), ("gen CPU", ">7.0%"), ("", "")],
]


def load_row(r: LoadResult) -> tuple:
    server_cpu = None if r.server_cpu_seconds is None else r.server_cpu_seconds / r.seconds
    what = f"open {r.offered_rate:g}/s" if r.load == "open" else f"closed {r.clients} clients"
    return (r.service, what, r.images_per_request, r.requests_per_second, r.images_per_second, r.p50_ms, r.p99_ms, r.max_ms) + (
        r.error_count,
        server_cpu,
        r.client_cpu_seconds / r.seconds,
        " saturated" if r.saturated else "",
    )


def load_table(services: dict[str, dict]) -> str:
    lines = [table(LOAD_COLUMNS, [load_row(r) for s in services.values() for r in s["runs"]])]
    for name, s in services.items():
        if s["skipped_rates"]:
            lines.append(f"{name:<17} open {', '.join(f'{x:g}' for x in s['skipped_rates'])}/s: not run (saturated below)")
    return "\n".join(lines)


def print_ratios(ratios: dict, services: dict[str, dict], batch: int, clients: int) -> None:
    for name, r in ratios.items():
        runtime = services[name].get("runtime") or "?"
        for key, label in (("single", "single images"), (f"batch_{batch}", f"batches of {batch}")):
            x = r["throughput"][key]
            print(
                f"{name} ({runtime}), peak throughput, {clients} clients, {label}: "
                f"{fmt(x['ours_images_per_second'], ',.0f')} img/s, naive {fmt(x['naive_images_per_second'], ',.1f')} img/s"
                f" -> {fmt(x['ours_over_naive'], '.1f')}x"
            )
        for rate, x in r["p99_at_rate"].items():
            naive = f"naive {fmt(x['naive_p99_ms'], '.1f')} ms" + (f" [{x['naive_note']}]" if x["naive_note"] else "")
            print(
                f"{name} ({runtime}), p99 at {rate} req/s: {fmt(x['ours_p99_ms'], '.2f')} ms ({x['ours_errors']} errors), "
                f"{naive}, naive/{name} {fmt(x['naive_over_ours'], '.1f')}x; {name}/in-process {r['in_process_method']} "
                f"{fmt(x['ours_over_in_process_same_runtime'], '.1f')}x"
            )
        for key, value in r["targets"].items():
            print(f"target {key} ({name}): {'not measured' if value is None else ('met' if value else 'NOT met')}")


def print_same_run(comparisons: dict, batch: int, clients: int) -> None:
    labels = {
        "single": f"peak throughput, {clients} clients, single images",
        "batch": f"peak throughput, {clients} clients, batches of {batch}",
        "p99": f"p99 at {TARGET_RATE:g} req/s",
    }
    for key, c in comparisons.items():
        name, base, _, covered, issue = SAME_RUN[key]
        for load, row in c["loads"].items():
            figure, unit, pattern = ("p99_ms", "ms", ".2f") if load == "p99" else ("images_per_second", "img/s", ",.0f")
            values = row[figure]
            paired = ", ".join(f"{r:.3f}" for r in row.get("round_ratios", []))
            rounds = f" (median of the rounds' {paired})" if paired else ""
            print(
                f"{key}: {labels[load]}: {name} {fmt(values[name], pattern)} {unit}, {base} {fmt(values[base], pattern)} "
                f"{unit} -> {name}/{base} {fmt(row[f'{name}_over_{base}'], '.3f')}{rounds}"
                f" (errors {row['errors'][name]}, {row['errors'][base]}){'' if load in covered else ' [not in the target]'}"
            )
            if share := row.get("log_writer_share"):
                print(f"  {name}'s log writer took {share:.1%} of its CPU an image: alone it makes {name}/{base} {1 - share:.3f}")
        if len(set(c["runtimes"].values())) > 1:
            print(f"  WARNING: {name} ran {c['runtimes'][name]} but {base} ran {c['runtimes'][base]}: the target is not judged")
        if SAME_RUN[key][2] is None:
            print(f"{key}: {issue}")
            continue
        met = "not measured" if c["target_met"] is None else ("met" if c["target_met"] else "NOT met")
        print(f"target {key}: {issue} ({name} over {base}): {met}")


def log_line(name: str, written: dict) -> str:
    """What a service's prediction log did, from its ``/model``."""
    if written.get("problem"):
        return f"{name}: prediction log not written: {written['problem']}"
    line = (
        f"{name}: prediction log {written['written']:,} answers written, {written['dropped']} dropped, "
        f"{written['failed']} failed, {written['queued']} still queued"
    )
    if written.get("cpu_seconds") and written["written"]:
        line += f"; its writer's own CPU {written['cpu_seconds'] / written['written'] * 1e6:.1f} µs an answer"
    return line


def print_exports(models: Models) -> None:
    """With ``--compare-int8-softmax``: what the checks said of the two int8 exports."""
    checks = models.checks
    if old := checks.get("int8_softmax", {}).get("tflite-int8"):
        print(
            f"v{models.version_of(INT8_SOFTMAX)} int8 export, softmax in int8 (as built before): the Keras model's digit on "
            f"{old['same_digits']:,} of {old['images']:,} test images, probabilities in steps of 1/256: "
            f"{'yes' if old['probabilities_in_steps_of_1_256'] else 'NO'}, no calibration"
        )
    if old and (new := checks.get("project", {}).get("tflite-int8")):
        kept = (
            "kept"
            if new["ok"]
            else ("not kept by its check, served for the comparison" if new.get("kept_for_the_comparison") else "NOT kept")
        )
        print(
            f"v{models.ref.version} int8 export, softmax in float (as built now): the Keras model's digit on "
            f"{new['same_digits']:,} of {new['images']:,} test images ({kept}), "
            f"temperature {checks['project']['temperature']:.3f}"
        )


def print_errors(services: dict[str, dict], models: Models) -> None:
    """Per service: errors by kind, the model versions that answered, the digits unlike the in-process model's."""
    for name, s in services.items():
        if s.get("failed"):
            print(f"{name}: NOT MEASURED, the server did not start: {s['failed'].splitlines()[0]}")
            continue
        kinds = sum((Counter(r.errors) for r in s["runs"]), Counter(s["warm_up_errors"]))  # warm-ups: "warm-up ..."
        warm = sum(n for kind, n in kinds.items() if kind.startswith("warm-up "))
        print(
            f"{name}: {kinds.total() - warm} errors in {sum(r.requests for r in s['runs']):,} measured requests, "
            f"{warm} more in warm-ups ({dict(kinds) or 'no errors'}); model version(s) answering "
            f"{', '.join(answering(s)) or '?'}; {sum(r.differing_answers for r in s['runs'])} answers differ from the "
            "in-process model's digit"
        )
        if answering(s) != [models.version_of(name)]:
            print(
                f"  WARNING: {name} was to answer with v{models.version_of(name)} but answered with v{', v'.join(answering(s))}: "
                "the champion moved during the run (differing answers and latencies around the swap come from that)"
            )
        if s.get("prediction_log"):
            print("  " + log_line(name, s["prediction_log"]))


def report(
    args, ratios: dict, comparisons: dict, services: dict[str, dict], in_process: dict, models: Models, compared: dict
) -> None:
    columns = [("in-process", "<20"), ("img/call", ">8"), ("calls", ">6"), ("p50 ms", ">8.2f"), ("p99 ms", ">8.2f")]
    columns += [("max ms", ">8.1f"), ("img/s", ">9,.0f")]
    keys = ("method", "images_per_call", "calls", "p50_ms", "p99_ms", "max_ms", "images_per_second")
    print("\n" + table(columns, [[r[k] for k in keys] for r in in_process["results"]]) + "\n")
    print(load_table(services) + "\n")
    print_ratios(ratios, services, args.batch, args.clients)
    local = {(r["method"], r["images_per_call"]): r for r in in_process["results"]}
    one_image = [f"{m} {local[m, 1]['p99_ms']:.2f} ms" for m in METHODS if (m, 1) in local]
    print(f"(in-process, one image, p99: {', '.join(one_image)})")
    print_same_run(comparisons, args.batch, args.clients)
    print_peers(compared, args.batch, args.clients)
    print_exports(models)
    print_errors(services, models)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = harness.command_line(__doc__, OUTPUT, quick="smoke run: 2 s per load, fewer in-process calls (figures not comparable)")
    p.add_argument(
        "--no-pin", action="store_true", help="do not pin the server to the first CPU and the load generator to the second"
    )
    p.add_argument("--rates", type=float, nargs="+", default=list(RATES), help="open-loop rates, requests/s")
    p.add_argument("--seconds", type=float, default=None, help="seconds per load (default 15, --quick 2)")
    p.add_argument("--clients", type=int, default=CLIENTS, help="concurrent clients of the closed loop")
    p.add_argument("--batch", type=int, default=BATCH, help="images per request of the batch loads")
    selectable = [name for name in SERVICES if name != INT8_SOFTMAX]
    p.add_argument("--services", nargs="+", default=selectable, choices=selectable)
    p.add_argument(
        "--home", type=Path, help="project folder whose store holds the champion (default: DIGITS_HOME, else this project)"
    )
    p.add_argument(
        "--fresh-model", action="store_true", help="train a model for 1 epoch into a temporary store even if there is a champion"
    )
    p.add_argument(
        "--compare-int8-softmax",
        action="store_true",
        help=f"train a model into a temporary store, log it twice (the int8 export as built before, with its softmax "
        f"in int8; and as the project logs it now) and measure the first as {INT8_SOFTMAX}, then ours and --services",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure the services this many times, in turn, and keep each load's median round: same-run ratios "
        "within a few per cent need 3 or more (one round varies by about 10 %%)",
    )
    p.add_argument(
        "--together",
        action="store_true",
        help="start the services once and keep them all running (only the one measured has load): a round's "
        "services are then measured seconds apart, not a server's start apart, and the same processes each round",
    )
    p.add_argument("--timeout", type=float, default=None, help="seconds before a request counts as timed out (10)")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds a server may take to load the model")
    p.add_argument("--in-process", default=None, help=argparse.SUPPRESS)  # the child of run_in_process
    args = p.parse_args(argv)
    if args.rounds < 1 or (args.rounds > 1 and args.compare_int8_softmax):
        p.error("--rounds takes 1 or more, and only 1 with --compare-int8-softmax (which moves the champion once)")
    if args.together and (args.compare_int8_softmax or SHADOW in args.services):
        p.error(f"--together cannot take --compare-int8-softmax or {SHADOW}: they move an alias between services")
    args.seconds = args.seconds or (2.0 if args.quick else 15.0)
    args.warmup = 1.0 if args.quick else 3.0
    args.timeout = args.timeout or 10.0
    return args


def record(
    args,
    cpus,
    pin_checks: dict,
    models: Models,
    spec: dict,
    in_process: dict,
    services: dict,
    ratios: dict,
    comparisons: dict,
    compared: dict,
) -> dict:
    """The JSON's figures, beside the machine."""
    return {
        "quick": args.quick,
        "pinning": {"used": cpus is not None, "description": pinning_note(cpus), "servers": pin_checks},
        "model": models.to_dict(),
        "settings": {
            "rates": args.rates,
            "seconds": args.seconds,
            "warmup_seconds": args.warmup,
            "clients": args.clients,
            "batch": args.batch,
            "timeout_seconds": args.timeout,
            "rounds": args.rounds,
            "image_pool": spec["pool"],
            "in_process_calls": spec["calls"],
        },
        "targets": {
            "p99_ms_at_rate": {"rate": TARGET_RATE, "p99_ms": TARGET_P99_MS},
            "throughput_ratio_vs_naive": TARGET_THROUGHPUT_RATIO,
            "same_run": {
                key: {"service": name, "baseline": base, "largest_share_slower": slower, "covers": list(covered), "issue": issue}
                for key, (name, base, slower, covered, issue) in SAME_RUN.items()
            },
        },
        "in_process": in_process["results"],
        "in_process_tf_threads": in_process["tf_threads"],
        "services": {
            n: {**{k: v for k, v in s.items() if k != "runs"}, "runs": [without_latencies(r) for r in s["runs"]]}
            for n, s in services.items()
        },
        "ratios": ratios,
        "same_run": comparisons,
        "peers": compared,
        "versions_answering": {name: answering(s) for name, s in services.items()},
    }


def without_latencies(run: LoadResult) -> dict:
    return {name: value for name, value in asdict(run).items() if name != "latencies"}


def pinning_note(cpus: tuple[set[int], set[int]] | None) -> str:
    if cpus is None:
        return "not pinned: server and load generator share the CPUs"
    return f"server on CPU {sorted(cpus[0])}, load generator on CPU {sorted(cpus[1])}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.in_process is not None:
        run_child(args.in_process)
    os.chdir(ROOT)
    base_env = dict(os.environ)
    if not has_dataset(ROOT / "data"):
        ingest(load_params(ROOT / "params.yaml").data, ROOT / "data", ROOT / ".cache")
    dataset = load_dataset(ROOT / "data")
    cpus = harness.split_cpus(args.no_pin)
    server_cpus = cpus[0] if cpus else None
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="serving-benchmark-") as tmp_name:
        tmp = Path(tmp_name)
        models, env = choose_model(args, base_env, dataset, tmp)
        ref, old = models.ref, models.old
        say(f"model: {ref.uri} (run {ref.run_id}), {models.note}")
        say(f"pinning: {pinning_note(cpus)}")
        pool_size = args.batch * (8 if args.quick else 32)  # the test images the requests cycle through
        encoded: dict[str, list[Workload]] = {}  # encoding -> single images, batches

        def workloads(name: str) -> list[Workload]:
            encoding = PROTOCOLS.get(name, DEFAULT_PROTOCOL)[0]
            if encoding not in encoded:
                encoded[encoding] = [Workload.of(dataset.x_test[:pool_size], n, encoding) for n in (1, args.batch)]
            return encoded[encoding]

        for name in ("ours", *args.services):  # encoded before the heap is frozen
            workloads(name)
        if cpus:
            harness.pin_this_process(cpus[1])
        calls = in_process_calls(args.quick, args.batch, old is not None)
        spec = {"uri": ref.uri, "run_id": ref.run_id, "pool": pool_size, "calls": calls}
        spec["int8_softmax_run_id"] = old.run_id if old else None
        in_process = run_in_process(spec, env, server_cpus)
        gc.collect()
        gc.freeze()  # the pre-encoded bodies and the rest of this process stay out of collections under load
        measured: dict[str, list[dict]] = {}
        pin_checks = {}
        # the old int8 version answers first, as the champion; then the project's, right after it
        names = [INT8_SOFTMAX, "ours", *(n for n in args.services if n != "ours")] if old else args.services
        with contextlib.ExitStack() as running:
            servers: dict[str, Server] = {}  # --together: every service started once, here
            for name in names if args.together else ():
                try:
                    servers[name] = running.enter_context(started(name, args, env, tmp, server_cpus))
                except harness.ServerNotReady as err:
                    measured[name] = [not_ready(err, tmp)]
            for round_number in range(1, args.rounds + 1):
                if args.rounds > 1:
                    say(f"round {round_number} of {args.rounds}")
                # every other round in the reverse order: a service measured right after another (its server
                # just stopped, its files just written) should not always be the same one
                for name in names if round_number % 2 else names[::-1]:
                    if args.together and name not in servers:
                        continue
                    if name == SHADOW:
                        if not models.trained_here:
                            say(
                                f"{SHADOW}: not measured: it registers a version, so it needs a model trained here"
                                " (--fresh-model)"
                            )
                            continue
                        say(f"{SHADOW}: v{shadow_challenger(ref).version} (a copy of v{ref.version}) runs in the shadows")
                    expected = np.asarray(in_process["digits"])
                    version = models.version_of(name)
                    if name in servers:
                        result, pins = measure_running(name, servers[name], args, expected, workloads(name), tmp, version)
                    else:
                        result, pins = measure_one(name, args, env, expected, workloads(name), tmp, server_cpus, version)
                    measured.setdefault(name, []).append(result)
                    if name == SHADOW:
                        shadow_challenger(None)
                    if pins:
                        pin_checks[name] = pins
                    if name == INT8_SOFTMAX:  # each server loads the champion as it starts: the next ones get the project's
                        promote(ref, old, "serving benchmark: the same model, its int8 export (softmax in float), calibrated")
        services = {name: median_of_rounds(results) for name, results in measured.items()}

    ratios = compare(services, in_process["results"], args.batch)
    comparisons = same_run(services, args.batch)
    compared = peers(services, args.batch)
    report(args, ratios, comparisons, services, in_process, models, compared)
    print(
        f"({os.cpu_count()} CPUs shared by server and load generator; {pinning_note(cpus)}; niceness {os.nice(0)}; "
        f"load average before {load_before[0]:.2f}; TensorFlow threads in-process {in_process['tf_threads']}; "
        "latency from the scheduled send time in the open loop)"
    )
    if args.quick:
        print("(--quick: smoke run, the figures mean nothing)")
    machine = {"niceness": os.nice(0), "load_average_before": [round(x, 2) for x in load_before]}
    versions = harness.package_versions("bentoml", "keras", "aiohttp", "ai-edge-litert", "uvloop")
    figures = record(args, cpus, pin_checks, models, spec, in_process, services, ratios, comparisons, compared)
    harness.write_results(args.output, "serving_latency", machine_extra={**versions, **machine}, **figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
