"""The retraining steps, each a plain function the Prefect flow, the CLI and ``dvc repro`` all call.

Steps hand each other small values (an MLflow run id, a model URI, metrics), never arrays.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline import registry, versioning
from pipeline.data import Dataset, has_dataset, ingest, load_dataset
from pipeline.evaluate import Metrics, compute_metrics, predict_classes
from pipeline.gate import Check, GateDecision, decide
from pipeline.params import Params
from pipeline.settings import Settings
from pipeline.validation import DataValidationError, ValidationReport, validate_dataset

log = logging.getLogger(__name__)

SMOKE_IMAGES = 32


@dataclass(frozen=True)
class Candidate:
    run_id: str
    model_uri: str
    metrics: Metrics
    smoke_digits: tuple[int, ...]  # its answers on the first test images, to check the registered copy

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "metrics": self.metrics.to_dict()}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Candidate:
        raw = json.loads(text)
        metrics = raw.pop("metrics")
        return cls(
            **{**raw, "smoke_digits": tuple(raw["smoke_digits"])},
            metrics=Metrics(
                **{
                    k: tuple(map(tuple, v)) if k == "confusion" else (tuple(v) if isinstance(v, list) else v)
                    for k, v in metrics.items()
                }
            ),
        )


@dataclass(frozen=True)
class Outcome:
    decision: GateDecision
    registered: registry.ModelRef | None
    champion: registry.ModelRef | None


# ---------------------------------------------------------------- data


def prepare_data(settings: Settings, params: Params) -> versioning.DataVersion:
    """Make sure data/ holds a dataset (pull the committed version, else ingest) and record its version."""
    root, data_dir = settings.home, settings.data_dir
    if not has_dataset(data_dir) and not versioning.pull(root, data_dir):
        ingest(params.data, data_dir, settings.cache_dir)
    version = versioning.record(root, data_dir)
    log.info("data version %s (%d files, %.1f MB)", version.short, version.files, version.size / 1e6)
    return version


# ---------------------------------------------------------------- tracking


def start_run(
    settings: Settings,
    params: Params,
    data_version: versioning.DataVersion,
    run_name: str | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Open the MLflow run that every later step logs into; returns its id.

    With ``parent_run_id`` the run is nested under that one (a sweep's candidates under the sweep).
    """
    import mlflow
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    registry.connect(settings)
    commit = versioning.git_commit(settings.home) or "unknown"
    # the parent is named by tag, not by mlflow's active-run stack: the parent is not active here
    tags = {MLFLOW_PARENT_RUN_ID: parent_run_id} if parent_run_id else None
    run_id = mlflow.start_run(run_name=run_name, tags=tags).info.run_id
    with _active(run_id):
        mlflow.log_params({**params.flat(), "data_version": data_version.short})
        mlflow.set_tags({"data_version": data_version.md5, "git_commit": commit, "data_pushed": str(data_version.pushed)})
        mlflow.log_dict(params.model_dump(), "params.json")
    return run_id


@contextmanager
def _active(run_id: str) -> Iterator[None]:
    """Make ``run_id`` the active run for logging, and leave it RUNNING: only finish_run ends it."""
    import mlflow

    if mlflow.active_run() is None or mlflow.active_run().info.run_id != run_id:
        mlflow.start_run(run_id=run_id)
    try:
        yield
    finally:
        mlflow.end_run(status="RUNNING")


def finish_run(settings: Settings, run_id: str, failed: bool = False, stopped_at: str | None = None) -> None:
    client = registry.connect(settings)
    if stopped_at:
        client.set_tag(run_id, "stopped_at", stopped_at)
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


# ---------------------------------------------------------------- validation


def validate(settings: Settings, params: Params, run_id: str | None = None) -> ValidationReport:
    """Great Expectations on the dataset; raises DataValidationError naming every failed expectation.

    With a ``run_id`` the HTML report and the statistics are logged into that MLflow run.
    """
    import mlflow

    report_dir = settings.reports_dir / "validation"
    report = validate_dataset(load_dataset(settings.data_dir), params.validation, report_dir)
    if run_id is not None:
        registry.connect(settings)
        with _active(run_id):
            mlflow.log_artifacts(str(report.report_html.parent), "validation_report")
            mlflow.log_metrics({f"validation_{k}": float(v) for k, v in report.statistics.items()})
            mlflow.log_text(report.summary(), "validation_summary.md")
            mlflow.set_tag("validation", "passed" if report.success else "failed")
    if not report.success:
        raise DataValidationError(report)
    return report


# ---------------------------------------------------------------- training and evaluation


def _log_epoch(run_id: str, epoch: int, values: dict[str, float]) -> None:
    """One batched call per epoch (each MLflow call costs milliseconds on sqlite)."""
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    MlflowClient().log_batch(run_id, metrics=[Metric(k, v, now, epoch) for k, v in values.items()])


def _log_evaluation(dataset: Dataset, metrics: Metrics, probabilities: np.ndarray, history: dict) -> None:
    """Metrics and the figures people look at, into the active run."""
    import mlflow

    from pipeline import plots

    mlflow.log_metrics(metrics.flat())
    mlflow.log_dict(metrics.to_dict(), "evaluation/metrics.json")
    mlflow.log_table(
        {
            "digit": list(range(10)),
            "precision": list(metrics.class_precision),
            "recall": list(metrics.class_recall),
            "f1": list(metrics.class_f1),
            "support": [sum(row) for row in metrics.confusion],
        },
        "evaluation/per_class.json",
    )
    mlflow.log_figure(plots.learning_curves(history), "plots/learning_curves.png")
    mlflow.log_figure(plots.confusion_matrix(metrics), "plots/confusion_matrix.png")
    mlflow.log_figure(plots.per_class_scores(metrics), "plots/per_class_scores.png")
    mlflow.log_figure(plots.misclassified_grid(dataset.x_test, dataset.y_test, probabilities), "plots/misclassified.png")


def train_candidate(settings: Settings, params: Params, run_id: str) -> Candidate:
    """Train, evaluate on the test set, and log model, metrics and plots into the run."""
    import keras
    import mlflow
    import mlflow.tensorflow
    from mlflow.models import infer_signature

    from pipeline.preprocess import to_model_input
    from pipeline.train import compiled_predictor, train

    registry.connect(settings)
    keras.utils.disable_interactive_logging()  # no progress bars from MLflow's input-example checks
    dataset = load_dataset(settings.data_dir)
    result = train(dataset, params, on_epoch=lambda epoch, values: _log_epoch(run_id, epoch, values))
    probabilities, predicted = predict_classes(compiled_predictor(result.model), dataset.x_test)
    metrics = compute_metrics(dataset.y_test, predicted)
    log.info(
        "test accuracy %.4f, lowest class recall %.4f (digit %d)",
        metrics.accuracy,
        metrics.min_class_recall,
        metrics.weakest_class,
    )
    with _active(run_id):
        mlflow.log_metrics({"train_seconds": result.seconds, "train_images_per_second": result.images_per_second})
        _log_evaluation(dataset, metrics, probabilities, result.history)
        example = to_model_input(dataset.x_test[:2])
        info = mlflow.tensorflow.log_model(
            result.model,
            name="model",
            signature=infer_signature(example, probabilities[:2]),
            input_example=example,
            # stated, not inferred: inference re-imports the model in a subprocess (~20 s)
            pip_requirements=_model_requirements(),
        )
        _export_for_serving(result.model, dataset, probabilities)
    return Candidate(run_id, info.model_uri, metrics, tuple(int(d) for d in predicted[:SMOKE_IMAGES]))


def _export_for_serving(model, dataset: Dataset, probabilities: np.ndarray) -> None:
    """Log the TensorFlow Lite exports the service runs, checked on the whole test set (into the active run).

    A failed conversion costs the run nothing: the service then runs the Keras model.
    """
    from pipeline import export

    try:
        checks = export.log_tflite_exports(
            model,
            dataset.x_test,
            probabilities,
            calibration=dataset.x_train[: export.CALIBRATION_IMAGES],
            threads=os.cpu_count() or 1,
        )
    except Exception as err:  # the converter's failures are many and version-specific
        log.warning("no TensorFlow Lite export (%s: %s); the service will run the Keras model", type(err).__name__, err)
        return
    for runtime, check in checks.items():
        if check.ok:
            log.info("%s export for serving: %s", runtime, check.summary())
        else:
            log.warning("%s export not kept (%s)", runtime, check.summary())


# ---------------------------------------------------------------- sweep trials


@dataclass(frozen=True)
class Trial:
    """A sweep candidate, trained and scored on the validation hold-out only: the test set is untouched."""

    run_id: str
    model_uri: str
    val_accuracy: float
    val_loss: float


def limit_tf_threads(threads: int) -> None:
    """Size TensorFlow's thread pools before its runtime starts, so parallel trainings share the cores."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # this process trained before: its pools keep the sizes they started with
        log.info("TensorFlow is initialised already in this process; its thread pools keep their sizes")


def train_trial(settings: Settings, params: Params, run_id: str, tags: dict[str, str] | None = None) -> Trial:
    """Train one sweep candidate into its run: per-epoch metrics, learning curves, the model.

    Nothing here reads the test split. The candidate is judged on its last epoch's validation
    accuracy (the hold-out of ``train.validation_split``); only the chosen one meets the test set,
    in ``evaluate_trial`` and the gate.
    """
    import keras
    import mlflow
    import mlflow.tensorflow
    from mlflow.models import infer_signature

    from pipeline import plots
    from pipeline.preprocess import to_model_input
    from pipeline.train import train

    if params.train.validation_split <= 0:
        raise ValueError("a sweep trial needs a validation hold-out: set train.validation_split above 0")
    registry.connect(settings)
    keras.utils.disable_interactive_logging()
    dataset = load_dataset(settings.data_dir)
    result = train(dataset, params, on_epoch=lambda epoch, values: _log_epoch(run_id, epoch, values))
    trial_metrics = {"val_accuracy": result.history["val_accuracy"][-1], "val_loss": result.history["val_loss"][-1]}
    log.info("validation accuracy %.4f, loss %.4f", trial_metrics["val_accuracy"], trial_metrics["val_loss"])
    example = to_model_input(dataset.x_train[:2])  # a training image: the test split stays unseen
    with _active(run_id):
        mlflow.set_tags(tags or {})
        mlflow.log_metrics({"train_seconds": result.seconds, "train_images_per_second": result.images_per_second})
        mlflow.log_metrics({f"final_{k}": v for k, v in trial_metrics.items()})
        mlflow.log_figure(plots.learning_curves(result.history), "plots/learning_curves.png")
        info = mlflow.tensorflow.log_model(
            result.model,
            name="model",
            signature=infer_signature(example, np.asarray(result.model(example, training=False))),
            input_example=example,
            pip_requirements=_model_requirements(),
        )
    return Trial(run_id, info.model_uri, trial_metrics["val_accuracy"], trial_metrics["val_loss"])


def best_trial(trials: list[Trial]) -> Trial:
    """The highest validation accuracy; a tie goes to the lower validation loss, then to the earlier candidate."""
    if not trials:
        raise ValueError("no trial to choose from: every sweep candidate failed")
    return min(enumerate(trials), key=lambda item: (-item[1].val_accuracy, item[1].val_loss, item[0]))[1]


def evaluate_trial(settings: Settings, trial: Trial) -> Candidate:
    """The chosen trial on the test set: metrics and plots into its run, as ``train_candidate`` logs them."""
    from pipeline.train import compiled_predictor

    client = registry.connect(settings)
    dataset = load_dataset(settings.data_dir)
    model = registry.load_keras(trial.model_uri)
    probabilities, predicted = predict_classes(compiled_predictor(model), dataset.x_test)
    metrics = compute_metrics(dataset.y_test, predicted)
    log.info("chosen trial on the test set: accuracy %.4f, lowest class recall %.4f", metrics.accuracy, metrics.min_class_recall)
    history = {
        key: [m.value for m in sorted(client.get_metric_history(trial.run_id, key), key=lambda m: m.step)]
        for key in ("loss", "accuracy", "val_loss", "val_accuracy")
    }
    with _active(trial.run_id):
        _log_evaluation(dataset, metrics, probabilities, history)
        _export_for_serving(model, dataset, probabilities)
    return Candidate(trial.run_id, trial.model_uri, metrics, tuple(int(d) for d in predicted[:SMOKE_IMAGES]))


def _model_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("tensorflow-cpu", "keras", "numpy", "mlflow")]


def score(model_uri: str, dataset: Dataset) -> tuple[Metrics, np.ndarray]:
    """Metrics of a stored model on the test split, and its first answers (for smoke checks)."""
    from pipeline.train import compiled_predictor

    _, predicted = predict_classes(compiled_predictor(registry.load_keras(model_uri)), dataset.x_test)
    return compute_metrics(dataset.y_test, predicted), predicted[:SMOKE_IMAGES]


# ---------------------------------------------------------------- gate and promotion


def gate(settings: Settings, params: Params, candidate: Candidate) -> GateDecision:
    """Floors, then the champion re-scored on the same test data in this run."""
    client = registry.connect(settings)
    champion = registry.get_alias(client, settings.model_name)
    champion_metrics = None
    if champion is not None:
        champion_metrics, _ = score(champion.uri, load_dataset(settings.data_dir))
        log.info("champion v%s re-scored: accuracy %.4f", champion.version, champion_metrics.accuracy)
        client.log_metric(candidate.run_id, "champion_test_accuracy", champion_metrics.accuracy)
    return decide(candidate.metrics, params.gate, champion_metrics, champion.version if champion else None)


def run_data_version(settings: Settings, run_id: str) -> str:
    """The data version a run trained on (its DVC hash)."""
    return registry.connect(settings).get_run(run_id).data.tags.get("data_version", "unknown")


def _smoke_check(model_uri: str, dataset: Dataset, expected: tuple[int, ...]) -> Check:
    try:
        from pipeline.train import compiled_predictor

        probabilities, digits = predict_classes(compiled_predictor(registry.load_keras(model_uri)), dataset.x_test[:SMOKE_IMAGES])
    except Exception as err:  # any failure to load or answer is the finding
        return Check("smoke prediction from the registry", False, f"{model_uri} failed: {type(err).__name__}: {err}")
    ok = probabilities.shape == (len(expected), 10) and bool(np.isfinite(probabilities).all()) and tuple(digits) == expected
    detail = (
        f"{model_uri} answered {len(digits)} test images like the trained model"
        if ok
        else f"{model_uri} answers differ from the trained model's: {tuple(digits)[:8]} vs {expected[:8]}"
    )
    return Check("smoke prediction from the registry", ok, detail)


def _log_decision(client, run_id: str, decision: GateDecision) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "gate_decision.json").write_text(json.dumps(decision.to_dict(), indent=2))
        Path(tmp, "gate_decision.md").write_text(decision.to_markdown())
        client.log_artifacts(run_id, tmp, "gate")
    client.set_tag(run_id, "gate", "promote" if decision.promote else "reject")
    client.set_tag(run_id, "gate_reasons", "; ".join(decision.reasons)[:4000])


def promote(settings: Settings, candidate: Candidate, decision: GateDecision, data_version: str) -> Outcome:
    """Register a candidate that cleared the floors, smoke-test the registered copy, move ``champion``."""
    client = registry.connect(settings)
    if not decision.promote:
        _log_decision(client, candidate.run_id, decision)
        return Outcome(decision, None, registry.get_alias(client, settings.model_name))
    run_tags = client.get_run(candidate.run_id).data.tags
    version = registry.register(
        client,
        settings.model_name,
        candidate.model_uri,
        candidate.run_id,
        {
            "data_version": data_version,
            "git_commit": run_tags.get("git_commit", "unknown"),
            "test_accuracy": f"{candidate.metrics.accuracy:.4f}",
            "test_min_class_recall": f"{candidate.metrics.min_class_recall:.4f}",
            "gate_reasons": "; ".join(decision.reasons)[:4000],
        },
    )
    decision = decision.with_check(_smoke_check(version.uri, load_dataset(settings.data_dir), candidate.smoke_digits))
    if decision.promote:
        try:
            registry.move_champion(
                client, settings, version.version, decision.champion_version, "; ".join(decision.reasons), candidate.run_id
            )
        except registry.PromotionError as err:
            decision = decision.with_check(Check("champion unchanged since comparison", False, str(err)))
    client.set_model_version_tag(settings.model_name, version.version, "gate", "promote" if decision.promote else "reject")
    _log_decision(client, candidate.run_id, decision)
    if decision.promote:
        client.set_tag(candidate.run_id, "promoted_version", version.version)
    return Outcome(
        decision,
        registry.get_version(client, settings.model_name, version.version),
        registry.get_alias(client, settings.model_name),
    )


def write_reports(settings: Settings, candidate: Candidate | None = None, decision: GateDecision | None = None) -> None:
    """The stage outputs of dvc.yaml: reports/candidate.json and reports/gate.json."""
    settings.reports_dir.mkdir(parents=True, exist_ok=True)
    if candidate is not None:
        (settings.reports_dir / "candidate.json").write_text(candidate.to_json())
    if decision is not None:
        (settings.reports_dir / "gate.json").write_text(json.dumps(decision.to_dict(), indent=2))


def promote_version(settings: Settings, params: Params, version: str | None, allow_regression: bool = False) -> Outcome:
    """A person's override (``digits promote`` / ``digits rollback``) through the same checks.

    ``version=None`` means roll back to ``previous-champion``. The version is re-scored on the
    test set against the floors, compared with the champion unless ``allow_regression``, and
    loading it from the registry is the smoke check. The decision is logged as an MLflow run.
    """
    import mlflow

    client = registry.connect(settings)
    champion = registry.get_alias(client, settings.model_name)
    if version is None:
        previous = registry.get_alias(client, settings.model_name, registry.PREVIOUS)
        if previous is None:
            raise registry.PromotionError("there is no previous champion to roll back to")
        version = previous.version
    target = registry.get_version(client, settings.model_name, version)
    if champion is not None and champion.version == target.version:
        raise registry.PromotionError(f"v{target.version} is already the champion")
    dataset = load_dataset(settings.data_dir)
    try:
        metrics, _ = score(target.uri, dataset)
    except Exception as err:  # a version that cannot load or answer is not promotable
        raise registry.PromotionError(f"v{target.version} failed the smoke check: {type(err).__name__}: {err}") from None
    champion_metrics = score(champion.uri, dataset)[0] if champion and not allow_regression else None
    decision = decide(metrics, params.gate, champion_metrics, champion.version if champion_metrics else None)
    decision = decision.with_check(Check("smoke prediction from the registry", True, f"{target.uri} loaded and answered"))
    if allow_regression and champion is not None:
        note = f"comparison with champion v{champion.version} skipped on request (override)"
        decision = dataclasses.replace(decision, champion_version=champion.version, notes=decision.notes + (note,))
    with mlflow.start_run(run_name=f"promote-v{target.version}") as run:
        mlflow.set_tags({"kind": "manual-promotion", "target_version": target.version})
        mlflow.log_metrics(metrics.flat())
    if decision.promote:
        try:
            registry.move_champion(
                client,
                settings,
                target.version,
                champion.version if champion else None,
                "manual: " + "; ".join(decision.reasons),
                run.info.run_id,
            )
        except registry.PromotionError as err:
            decision = decision.with_check(Check("champion unchanged since comparison", False, str(err)))
    _log_decision(client, run.info.run_id, decision)
    return Outcome(decision, target, registry.get_alias(client, settings.model_name))
