"""Evaluation use cases: a model as it is served, on MNIST's test set and on the out-of-distribution suite.

The suite's images go through the photo path once (cached under reports/suite/ for as long as the
test set, the suite's params and the preprocessing code stay the same); every model a run compares
is then scored on the same pixels.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from pipeline import registry, tracking
from pipeline.calibration import ConfidenceFigures, confidence_figures, reliability
from pipeline.data import Dataset, load_dataset
from pipeline.evaluate import Metrics, compute_metrics, predict_classes
from pipeline.params import Params
from pipeline.settings import Settings

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

# the family whose confidence is reported beside MNIST's: the one closest to what users send
PHOTOGRAPHED = "photographed"
# harvested corrections' test part: scored beside the suite's families when the data version holds one
FEEDBACK = "feedback"


class SuiteImages(NamedTuple):
    """One family as the model sees it: normalised pixels, labels, and the images the photo path refused."""

    pixels: np.ndarray  # uint8 (n, 28, 28)
    labels: np.ndarray  # int64 (n,)
    refused: np.ndarray  # bool (n,): the service would answer these with an error, so they count as wrong


@dataclass(frozen=True)
class Scores:
    """One model, as served, on the test set and on every family of the suite."""

    runtime: str
    metrics: Metrics  # on MNIST's test set
    digits: np.ndarray  # its digit for every test image, for the paired comparison with another model
    families: dict[str, float]  # accuracy per family
    refused: dict[str, int]
    confidence: dict[str, ConfidenceFigures] = field(default_factory=dict)  # on "mnist" and the photographed family
    ece: dict[str, float] = field(default_factory=dict)
    answers: dict[str, np.ndarray] = field(default_factory=dict)  # its digit for every image of each family

    def to_dict(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "mnist": round(self.metrics.accuracy, 5),
            "families": {name: round(value, 5) for name, value in self.families.items()},
            "refused": self.refused,
            "confidence": {name: figures.to_dict() for name, figures in self.confidence.items()},
            "ece": {name: round(value, 5) for name, value in self.ece.items()},
        }


def suite_images(settings: Settings, params: Params, dataset: Dataset) -> dict[str, SuiteImages]:
    """Every family of the suite through the service's photo path, from the cache when it is current."""
    from pipeline import suite

    cache = settings.reports_dir / "suite" / f"{suite_digest(params, dataset)[:16]}.npz"
    if cache.exists():
        with np.load(cache) as stored:
            return {name: SuiteImages(*(stored[f"{name}/{part}"] for part in SuiteImages._fields)) for name in suite.FAMILY_NAMES}
    images: dict[str, SuiteImages] = {}
    for name, family in suite.build_suite(dataset.x_test, dataset.y_test, params.suite.size, params.suite.seed).items():
        normalised = suite.to_pixels(family)
        images[name] = SuiteImages(normalised.pixels, family.labels, normalised.refused)
        log.info("suite: %-13s %d images through the photo path, %d refused", name, len(family), int(normalised.refused.sum()))
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        cache, **{f"{name}/{part}": getattr(i, part) for name, i in images.items() for part in SuiteImages._fields}
    )
    return images


def suite_digest(params: Params, dataset: Dataset) -> str:
    """What the suite is rendered from and by: the test set, the suite's params, the rendering and preprocessing code."""
    from pipeline import preprocess, suite

    key = hashlib.sha256(dataset.x_test.tobytes() + dataset.y_test.tobytes())
    key.update(f"{params.suite.size}:{params.suite.seed}".encode())
    for module in (preprocess, suite):
        key.update(Path(module.__file__).read_bytes())
    return key.hexdigest()


def evaluation_sets(settings: Settings, params: Params, dataset: Dataset) -> dict[str, SuiteImages]:
    """The suite's families, and feedback-test as one more (``feedback``) when the dataset has it."""
    sets = suite_images(settings, params, dataset)
    if len(dataset.x_feedback_test):
        count = len(dataset.x_feedback_test)
        sets[FEEDBACK] = SuiteImages(dataset.x_feedback_test, dataset.y_feedback_test.astype(np.int64), np.zeros(count, bool))
    return sets


def score(
    run_id: str | None,
    model_uri: str,
    dataset: Dataset,
    suite: dict[str, SuiteImages],
    runtime: str = "tflite-int8",
    expected: dict[str, str] | None = None,
) -> Scores:
    """A training run's model as the service would run it (its export and calibration) on the test set and the suite.

    With ``expected`` (served file -> sha256) only files with those hashes are used, as the service does.
    """
    from pipeline.served import run_predictor

    predictor, runtime, calibration = run_predictor(run_id, model_uri, runtime, expected=expected)
    mnist, digits = predict_classes(predictor, dataset.x_test)
    families, refused, by_family = {}, {}, {}
    for name, images in suite.items():
        answers, _ = predict_classes(predictor, images.pixels)
        by_family[name] = answers
        families[name] = float(np.mean((answers.argmax(axis=1) == images.labels) & ~images.refused))
        refused[name] = int(images.refused.sum())
    answers = {name: probabilities.argmax(axis=1) for name, probabilities in by_family.items()}
    scores = Scores(runtime, compute_metrics(dataset.y_test, digits), digits, families, refused, answers=answers)
    if calibration is not None:
        shown = {"mnist": (mnist, dataset.y_test)}
        if PHOTOGRAPHED in suite:
            kept = ~suite[PHOTOGRAPHED].refused
            shown[PHOTOGRAPHED] = (by_family[PHOTOGRAPHED][kept], suite[PHOTOGRAPHED].labels[kept])
        for name, (answers, labels) in shown.items():
            scores.confidence[name] = confidence_figures(answers, labels, calibration.threshold)
            scores.ece[name] = reliability(answers, labels).ece
    return scores


def log_scores(
    client: MlflowClient, run_id: str, scores: Scores, champion: Scores | None = None, champion_version: str | None = None
) -> None:
    """The suite's table, its bar chart (beside the champion's, when there is one) and its figures, into the run."""
    from pipeline import plots

    figures = {f"suite_{name}_accuracy": accuracy for name, accuracy in scores.families.items()}
    for name, confidence in scores.confidence.items():
        figures |= {f"served_{name}_{key}": value for key, value in confidence.to_dict().items() if key != "images"}
    figures |= {f"served_{name}_ece": value for name, value in scores.ece.items()}
    tracking.log_metrics(run_id, {**figures, "served_test_accuracy": scores.metrics.accuracy})
    client.log_dict(run_id, scores.to_dict(), "evaluation/suite.json")
    client.log_table(
        run_id,
        {
            "family": list(scores.families),
            "accuracy": list(scores.families.values()),
            "refused": [scores.refused[name] for name in scores.families],
            **({"champion_accuracy": [champion.families.get(name) for name in scores.families]} if champion else {}),
        },
        "evaluation/suite_table.json",
    )
    figure = plots.suite_accuracy(
        scores.metrics.accuracy, scores.families, champion.families if champion else None, champion_version
    )
    client.log_figure(run_id, figure, "plots/suite.png")


def log_evaluation_data(
    settings: Settings, params: Params, run_id: str, dataset: Dataset, sets: dict[str, SuiteImages], scores: Scores
) -> None:
    """What a run was evaluated on, as its MLflow dataset inputs, and its mistakes on the weakest families (a figure).

    Bookkeeping: a failure is logged, and the gate goes on.
    """
    from app import lineage
    from pipeline import plots

    suite = {name: images for name, images in sets.items() if name != FEEDBACK}
    try:
        lineage.log_evaluation_data(settings, run_id, dataset, suite, suite_digest(params, dataset)[:32], params.suite.size)
        examples = weakest_family_mistakes(sets, scores)
        if examples:
            registry.connect(settings).log_figure(run_id, plots.family_mistakes(examples), "plots/suite_mistakes.png")
    except Exception as err:  # the datasets and the figure describe the run; they must not stop its gate
        log.warning("could not log the evaluation data of run %s: %s: %s", run_id, type(err).__name__, err)


def weakest_family_mistakes(
    sets: dict[str, SuiteImages], scores: Scores, families: int = 3, per_family: int = 8
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The first mistakes on the ``families`` least accurate families (refused images left out: they have no digit)."""
    weakest = sorted((name for name in scores.families if name in scores.answers), key=lambda name: scores.families[name])
    examples = {}
    for name in weakest:
        images, predicted = sets[name], scores.answers[name]
        wrong = np.flatnonzero((predicted != images.labels) & ~images.refused)[:per_family]
        if len(wrong):
            examples[name] = (images.pixels[wrong], images.labels[wrong], predicted[wrong])
        if len(examples) == families:
            break
    return examples


def evaluate_version(settings: Settings, params: Params, version: str | None = None) -> dict[str, Any]:
    """``digits evaluate``: a registered version (default: the champion) as served, on the test set and the suite."""
    client = registry.connect(settings)
    ref = (
        registry.get_version(client, settings.model_name, version) if version else registry.get_alias(client, settings.model_name)
    )
    if ref is None:
        raise registry.PromotionError("there is no champion to evaluate: run `digits retrain`, or name a version")
    dataset = load_dataset(settings.data_dir)
    scores = score(ref.run_id, ref.uri, dataset, evaluation_sets(settings, params, dataset), settings.serve_runtime)
    return {"model_name": ref.model_name, "version": ref.version, "images_per_family": params.suite.size, **scores.to_dict()}
