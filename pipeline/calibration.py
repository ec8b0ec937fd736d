"""Confidence that can be acted on: temperature scaling, the expected calibration error, the unsure threshold.

Everything here works on probabilities (n, 10) and labels, so it applies to any runtime's answers.
A temperature rescales the log-probabilities (equivalent to dividing the logits) and never changes a
digit; the threshold marks answers below it as unsure, chosen on the validation hold-out so that few
wrong answers are given without that mark.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.params import ConfidenceParams

ECE_BINS = 15
# where softmax underflows in float32: a floor keeps log-probabilities finite
SMALLEST_PROBABILITY = 1e-30
# inverse temperatures searched: a model may be at most this far over- or under-confident
INVERSE_TEMPERATURE_RANGE = (0.02, 50.0)


def log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """log(p), finite even where float32 rounded a probability to 0; as good as logits up to a shift per row."""
    return np.log(np.clip(np.asarray(probabilities, dtype=np.float64), SMALLEST_PROBABILITY, None))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.asarray(logits, dtype=np.float64) - np.max(logits, axis=-1, keepdims=True)
    exps = np.exp(shifted)
    return exps / exps.sum(axis=-1, keepdims=True)


def with_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities as the model would give them with its logits divided by ``temperature``."""
    if temperature == 1.0:
        return np.asarray(probabilities, dtype=np.float64)
    return softmax(log_probabilities(probabilities) / temperature)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    shift = scaled.max(axis=1)
    log_normaliser = shift + np.log(np.exp(scaled - shift[:, None]).sum(axis=1))
    return float(np.mean(log_normaliser - scaled[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises the negative log-likelihood of ``labels``.

    The likelihood is convex in the inverse temperature, so a golden-section search over it finds the
    optimum without a gradient (and without SciPy).
    """
    if len(labels) == 0:
        return 1.0
    labels = np.asarray(labels, dtype=np.int64)
    low, high = (math.log(bound) for bound in INVERSE_TEMPERATURE_RANGE)
    ratio = (math.sqrt(5) - 1) / 2

    def loss(log_inverse: float) -> float:
        return negative_log_likelihood(logits, labels, 1.0 / math.exp(log_inverse))

    # searched in log space: steps are relative, as a temperature's effect is
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    loss_a, loss_b = loss(a), loss(b)
    while high - low > 1e-5:
        if loss_a <= loss_b:
            high, b, loss_b = b, a, loss_a
            a = high - ratio * (high - low)
            loss_a = loss(a)
        else:
            low, a, loss_a = a, b, loss_b
            b = low + ratio * (high - low)
            loss_b = loss(b)
    return 1.0 / math.exp((low + high) / 2)


@dataclass(frozen=True)
class Reliability:
    """Answers grouped by confidence into equal-width bins: what a reliability diagram shows."""

    edges: tuple[float, ...]  # bins + 1 edges from 0 to 1
    confidence: tuple[float, ...]  # mean confidence per bin (0 where empty)
    accuracy: tuple[float, ...]  # share right per bin (0 where empty)
    counts: tuple[int, ...]
    ece: float


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # bins are (low, high]; a confidence of exactly 0 cannot happen for a top probability
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    mean_confidence = np.bincount(which, weights=confidence, minlength=bins) / np.maximum(counts, 1)
    accuracy = np.bincount(which, weights=correct.astype(np.float64), minlength=bins) / np.maximum(counts, 1)
    ece = float(np.sum(counts * np.abs(accuracy - mean_confidence)) / max(len(confidence), 1))
    return Reliability(
        tuple(edges.tolist()), tuple(mean_confidence.tolist()), tuple(accuracy.tolist()), tuple(counts.tolist()), ece
    )


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Mean gap between confidence and accuracy over equal-width confidence bins, weighted by their answers."""
    return reliability(probabilities, labels, bins).ece


def confident_error_share(confidence: np.ndarray, correct: np.ndarray, threshold: float) -> float:
    """Share of all answers that are wrong and given without "unsure" (confidence >= threshold)."""
    if len(confidence) == 0:
        return 0.0
    return float(np.sum((confidence >= threshold) & ~correct) / len(confidence))


def choose_threshold(
    confidence: np.ndarray, correct: np.ndarray, max_confident_error: float, floor: float, ceiling: float
) -> float:
    """The lowest threshold in [floor, ceiling] that keeps confidently wrong answers at ``max_confident_error`` or below.

    The share falls as the threshold rises, so the candidates are the floor and each wrong answer's
    confidence nudged above it; the ceiling when even that is not enough.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if confident_error_share(confidence, correct, floor) <= max_confident_error:
        return float(floor)
    candidates = np.unique(np.nextafter(confidence[~correct], np.inf))
    for threshold in candidates[(candidates > floor) & (candidates <= ceiling)]:
        if confident_error_share(confidence, correct, threshold) <= max_confident_error:
            return float(threshold)
    return float(ceiling)


@dataclass(frozen=True)
class ConfidenceFigures:
    """How far answers can be trusted at a threshold: what each run reports."""

    images: int
    accuracy: float
    accuracy_sure: float  # on answers not marked unsure (1.0 when every answer is unsure)
    unsure_share: float
    confident_error_share: float  # wrong answers given without "unsure", as a share of all answers

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def confidence_figures(probabilities: np.ndarray, labels: np.ndarray, threshold: float) -> ConfidenceFigures:
    probabilities = np.asarray(probabilities)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    sure = confidence >= threshold
    n = len(confidence)
    return ConfidenceFigures(
        images=n,
        accuracy=float(correct.mean()) if n else 0.0,
        accuracy_sure=float(correct[sure].mean()) if sure.any() else 1.0,
        unsure_share=float(1 - sure.mean()) if n else 0.0,
        confident_error_share=confident_error_share(confidence, correct, threshold),
    )


@dataclass(frozen=True)
class Calibration:
    """What a version's answers need to be trusted: the temperature its probabilities are served with,
    and the threshold under which an answer is marked unsure. Kept with the model as ``calibration.json``.
    """

    temperature: float
    threshold: float
    max_confident_error: float
    images: int  # validation images it was fitted on; 0: no hold-out, defaults
    ece_before: float | None = None
    ece_after: float | None = None
    bins: int = ECE_BINS
    validation: ConfidenceFigures | None = None  # at the threshold, after scaling

    def apply(self, probabilities: np.ndarray) -> np.ndarray:
        return with_temperature(probabilities, self.temperature)

    def unsure(self, probabilities: np.ndarray) -> np.ndarray:
        """Per answer of already-scaled probabilities: below the threshold."""
        return np.asarray(probabilities).max(axis=-1) < self.threshold

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Calibration:
        validation = raw.get("validation")
        return cls(**{**raw, "validation": ConfidenceFigures(**validation) if validation else None})

    @classmethod
    def uncalibrated(cls, params: ConfidenceParams) -> Calibration:
        """Without a validation hold-out: probabilities as they are, and the default threshold."""
        return cls(temperature=1.0, threshold=params.default_threshold, max_confident_error=params.max_confident_error, images=0)


def fit_calibration(probabilities: np.ndarray, labels: np.ndarray, params: ConfidenceParams, bins: int = ECE_BINS) -> Calibration:
    """Temperature and unsure threshold from a model's probabilities on validation images it did not train on."""
    if len(labels) == 0:
        return Calibration.uncalibrated(params)
    temperature = fit_temperature(log_probabilities(probabilities), labels)
    scaled = with_temperature(probabilities, temperature)
    correct = scaled.argmax(axis=1) == np.asarray(labels)
    threshold = choose_threshold(
        scaled.max(axis=1), correct, params.max_confident_error, params.min_threshold, params.max_threshold
    )
    return Calibration(
        temperature=temperature,
        threshold=threshold,
        max_confident_error=params.max_confident_error,
        images=len(labels),
        ece_before=expected_calibration_error(probabilities, labels, bins),
        ece_after=expected_calibration_error(scaled, labels, bins),
        bins=bins,
        validation=confidence_figures(scaled, labels, threshold),
    )
