"""Training use cases: train a model into its MLflow run, and evaluate it on the test set as a candidate.

A ``TrainedModel`` has met only its validation hold-out; a ``Candidate`` has been scored on the test
set and goes to the gate. The retrain flow does both at once; a sweep trains every grid point and
evaluates only the one it chooses. Steps hand each other run ids and a few numbers, never arrays.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from app import lineage
from pipeline import registry, tracking
from pipeline.calibration import Calibration
from pipeline.data import Dataset, load_dataset
from pipeline.evaluate import Metrics, compute_metrics, predict_classes
from pipeline.params import Params
from pipeline.settings import Settings

if TYPE_CHECKING:
    import keras

    from pipeline.train import TrainResult

log = logging.getLogger(__name__)

SMOKE_IMAGES = 32


@dataclass(frozen=True)
class TrainedModel:
    """A model logged in its run, judged so far on the validation hold-out only (None without one)."""

    run_id: str
    model_uri: str
    val_accuracy: float | None
    val_loss: float | None
    # temperature and unsure threshold fitted on the hold-out (defaults without one); logged with the exports
    calibration: Calibration | None = None


@dataclass(frozen=True)
class Candidate:
    """A trained model scored on the test set: what the gate decides on."""

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


def train(settings: Settings, params: Params, run_id: str, tags: dict[str, str] | None = None) -> TrainedModel:
    """Train on the training split into the run: per-epoch metrics, learning curves, the model. The test set stays unseen."""
    return _fit(settings, params, run_id, tags)[0]


def train_and_evaluate(settings: Settings, params: Params, run_id: str) -> Candidate:
    """Train, then score the model in memory on the test set, as ``evaluate`` does."""
    trained, result, dataset = _fit(settings, params, run_id)
    return _evaluate(trained, result.model, dataset)


def evaluate(settings: Settings, trained: TrainedModel) -> Candidate:
    """The trained model on the test set: metrics, plots and the serving exports into its run."""
    registry.connect(settings)
    return _evaluate(trained, registry.load_keras(trained.model_uri), load_dataset(settings.data_dir))


def best(trained: list[TrainedModel]) -> TrainedModel:
    """The highest validation accuracy; a tie goes to the lower validation loss, then to the earlier one."""
    if not trained:
        raise ValueError("no trained model to choose from: every sweep candidate failed")
    if any(t.val_accuracy is None for t in trained):
        raise ValueError("choosing needs a validation hold-out: set train.validation_split above 0")
    return min(enumerate(trained), key=lambda item: (-item[1].val_accuracy, item[1].val_loss, item[0]))[1]


def _fit(
    settings: Settings, params: Params, run_id: str, tags: dict[str, str] | None = None
) -> tuple[TrainedModel, TrainResult, Dataset]:
    import keras
    import mlflow
    import mlflow.tensorflow
    from mlflow.models import infer_signature

    from pipeline import plots
    from pipeline.preprocess import to_model_input
    from pipeline.train import train as fit

    registry.connect(settings)
    keras.utils.disable_interactive_logging()  # no progress bars from MLflow's input-example checks
    dataset = load_dataset(settings.data_dir)
    lineage.log_training_data(settings, run_id, dataset)
    result = fit(dataset, params, on_epoch=lambda epoch, values: tracking.log_epoch(run_id, epoch, values))
    validation = {k: result.history[k][-1] for k in ("val_accuracy", "val_loss") if result.history.get(k)}
    if validation:
        log.info("validation accuracy %.4f, loss %.4f", validation["val_accuracy"], validation["val_loss"])
    example = to_model_input(dataset.x_train[:2])  # a training image: the test split stays unseen
    with tracking.active(run_id):
        mlflow.set_tags(tags or {})
        mlflow.log_metrics({"train_seconds": result.seconds, "train_images_per_second": result.images_per_second})
        mlflow.log_metrics({f"final_{k}": v for k, v in validation.items()})
        mlflow.log_figure(plots.learning_curves(result.history), "plots/learning_curves.png")
        info = mlflow.tensorflow.log_model(
            result.model,
            name="model",
            signature=infer_signature(example, np.asarray(result.model(example, training=False))),
            input_example=example,
            # stated, not inferred: inferring re-imports the model in a subprocess
            pip_requirements=_model_requirements(),
        )
        calibration = _calibrate(result.model, dataset, params)
    trained = TrainedModel(run_id, info.model_uri, validation.get("val_accuracy"), validation.get("val_loss"), calibration)
    return trained, result, dataset


def _calibrate(model: keras.Model, dataset: Dataset, params: Params) -> Calibration:
    """Temperature and unsure threshold fitted on the validation hold-out, logged into the active run.

    The hold-out is the one training validated on: the model never learnt from it, so its confidence
    there is what new images will see.
    """
    import mlflow

    from pipeline import plots
    from pipeline.calibration import fit_calibration, reliability
    from pipeline.export import CALIBRATION_FILE, TFLITE_ARTIFACT_DIR
    from pipeline.train import compiled_predictor, split_for_validation

    *_, x_val, y_val = split_for_validation(dataset.x_train, dataset.y_train, params.train.validation_split, params.train.seed)
    if not len(x_val):
        calibration = Calibration.uncalibrated(params.confidence)
        log.info(
            "no validation hold-out (train.validation_split is 0): probabilities served as they are, unsure below %.3f "
            "(confidence.default_threshold)",
            calibration.threshold,
        )
    else:
        probabilities, _ = predict_classes(compiled_predictor(model), x_val)
        calibration = fit_calibration(probabilities, y_val, params.confidence)
        log.info(
            "calibrated on %d validation images: temperature %.3f, ECE %.4f -> %.4f, unsure below %.4f",
            calibration.images,
            calibration.temperature,
            calibration.ece_before,
            calibration.ece_after,
            calibration.threshold,
        )
        mlflow.log_metrics({"val_ece": calibration.ece_before, "val_ece_calibrated": calibration.ece_after})
        sure = calibration.validation  # val_accuracy is the per-epoch curve already: not logged again
        mlflow.log_metrics(
            {
                "val_accuracy_sure": sure.accuracy_sure,
                "val_unsure_share": sure.unsure_share,
                "val_confident_error_share": sure.confident_error_share,
            }
        )
        panels = {
            "as trained": reliability(probabilities, y_val),
            "calibrated": reliability(calibration.apply(probabilities), y_val),
        }
        mlflow.log_figure(plots.reliability_diagram(panels, "validation hold-out"), "plots/reliability_validation.png")
    mlflow.log_metrics({"temperature": calibration.temperature, "unsure_threshold": calibration.threshold})
    mlflow.log_dict(calibration.to_dict(), f"{TFLITE_ARTIFACT_DIR}/{CALIBRATION_FILE}")
    return calibration


def _evaluate(trained: TrainedModel, model: keras.Model, dataset: Dataset) -> Candidate:
    from pipeline.train import compiled_predictor

    probabilities, predicted = predict_classes(compiled_predictor(model), dataset.x_test)
    metrics = compute_metrics(dataset.y_test, predicted)
    log.info(
        "test accuracy %.4f, lowest class recall %.4f (digit %d)",
        metrics.accuracy,
        metrics.min_class_recall,
        metrics.weakest_class,
    )
    with tracking.active(trained.run_id):
        _log_evaluation(dataset, metrics, probabilities)
        _log_explained_mistakes(model, dataset, probabilities)
        _log_confidence(dataset, probabilities, trained.calibration)
        _export_for_serving(model, dataset, probabilities)
    return Candidate(trained.run_id, trained.model_uri, metrics, tuple(int(d) for d in predicted[:SMOKE_IMAGES]))


def _log_evaluation(dataset: Dataset, metrics: Metrics, probabilities: np.ndarray) -> None:
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
    mlflow.log_figure(plots.confusion_matrix(metrics), "plots/confusion_matrix.png")
    mlflow.log_figure(plots.per_class_scores(metrics), "plots/per_class_scores.png")
    mlflow.log_figure(plots.misclassified_grid(dataset.x_test, dataset.y_test, probabilities), "plots/misclassified.png")


def _log_explained_mistakes(model: keras.Model, dataset: Dataset, probabilities: np.ndarray, limit: int = 8) -> None:
    """The most confident mistakes with their saliency maps, for the model card's known limits."""
    import mlflow

    from pipeline import plots
    from pipeline.explain import Explainer

    predicted = probabilities.argmax(axis=1)
    mistakes = np.flatnonzero(predicted != dataset.y_test)
    shown = mistakes[np.argsort(-probabilities[mistakes, predicted[mistakes]])][:limit]
    if not len(shown):
        return
    explained = Explainer(model).explain(dataset.x_test[shown], [int(d) for d in predicted[shown]])
    saliencies = np.stack([e.saliency for e in explained])
    figure = plots.explained_mistakes(dataset.x_test[shown], dataset.y_test[shown], probabilities[shown], saliencies)
    mlflow.log_figure(figure, "plots/mistakes_explained.png")


def _log_confidence(dataset: Dataset, probabilities: np.ndarray, calibration: Calibration | None) -> None:
    """How far the answers can be trusted on the test set, as served (temperature and unsure threshold applied)."""
    import mlflow

    from pipeline import plots
    from pipeline.calibration import confidence_figures, reliability

    if calibration is None:  # trained before calibration existed: nothing to apply
        return
    served = calibration.apply(probabilities)
    figures = confidence_figures(served, dataset.y_test, calibration.threshold)
    panels = {"as trained": reliability(probabilities, dataset.y_test), "calibrated": reliability(served, dataset.y_test)}
    mlflow.log_metrics(
        {
            "test_ece": panels["as trained"].ece,
            "test_ece_calibrated": panels["calibrated"].ece,
            "test_accuracy_sure": figures.accuracy_sure,
            "test_unsure_share": figures.unsure_share,
            "test_confident_error_share": figures.confident_error_share,
        }
    )
    mlflow.log_dict(figures.to_dict(), "evaluation/confidence.json")
    mlflow.log_figure(plots.reliability_diagram(panels, "test set"), "plots/reliability.png")
    log.info(
        'test: %.2f %% marked unsure, accuracy %.4f on the rest, %.3f %% wrong without "unsure", ECE %.4f -> %.4f',
        100 * figures.unsure_share,
        figures.accuracy_sure,
        100 * figures.confident_error_share,
        panels["as trained"].ece,
        panels["calibrated"].ece,
    )


def _export_for_serving(model: keras.Model, dataset: Dataset, probabilities: np.ndarray) -> None:
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


def _model_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("tensorflow-cpu", "keras", "numpy", "mlflow")]
