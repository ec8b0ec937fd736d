"""Temperature scaling, the expected calibration error and the unsure threshold, on constructed answers."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.calibration import (
    Calibration,
    choose_threshold,
    confidence_figures,
    confident_error_share,
    expected_calibration_error,
    fit_calibration,
    fit_temperature,
    log_probabilities,
    reliability,
    softmax,
    with_temperature,
)
from pipeline.params import ConfidenceParams


def _calibrated_logits(n: int, seed: int = 0, scale: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from the model's own probabilities: calibrated by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, scale, size=(n, 10))
    probabilities = softmax(logits)
    labels = np.array([rng.choice(10, p=row) for row in probabilities])
    return logits, labels


def test_a_calibrated_model_keeps_temperature_one_and_has_almost_no_calibration_error():
    logits, labels = _calibrated_logits(20_000)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.05)
    assert expected_calibration_error(softmax(logits), labels) < 0.015


def test_an_over_confident_model_gets_a_temperature_above_one_and_a_lower_error():
    logits, labels = _calibrated_logits(10_000, seed=1)
    over_confident = softmax(logits * 2.5)  # the same answers, each pushed towards certainty
    calibration = fit_calibration(over_confident, labels, ConfidenceParams())
    assert calibration.temperature == pytest.approx(2.5, rel=0.1)
    assert calibration.ece_after < calibration.ece_before / 3
    assert calibration.images == 10_000


def test_an_under_confident_model_gets_a_temperature_below_one():
    logits, labels = _calibrated_logits(10_000, seed=2)
    assert fit_temperature(logits / 2, labels) == pytest.approx(0.5, rel=0.1)


def test_a_temperature_never_changes_a_digit_and_one_changes_nothing():
    probabilities = softmax(np.random.default_rng(3).normal(0, 4, size=(100, 10)))
    for temperature in (0.5, 2.0, 10.0):
        scaled = with_temperature(probabilities, temperature)
        assert (scaled.argmax(axis=1) == probabilities.argmax(axis=1)).all()
        np.testing.assert_allclose(scaled.sum(axis=1), 1.0)
    np.testing.assert_array_equal(with_temperature(probabilities, 1.0), probabilities)
    assert np.isfinite(log_probabilities(np.array([[1.0, 0.0]]))).all()


def test_the_error_of_a_hand_made_set():
    # two answers at 0.9 both right, two at 0.6 one right: |1 - 0.9| and |0.5 - 0.6|, each over half the answers
    probabilities = np.full((4, 10), 0.0)
    probabilities[:2, 0], probabilities[:2, 1] = 0.9, 0.1
    probabilities[2:, 0], probabilities[2:, 1] = 0.6, 0.4
    labels = np.array([0, 0, 0, 1])
    bins = reliability(probabilities, labels)
    assert bins.ece == pytest.approx(0.1)
    assert sum(bins.counts) == 4 and len(bins.edges) == 16


def test_the_threshold_meets_the_target_and_is_the_lowest_that_does():
    rng = np.random.default_rng(4)
    confidence = rng.uniform(0.3, 1.0, 5000)
    correct = rng.uniform(size=5000) < confidence  # the surer, the more often right
    threshold = choose_threshold(confidence, correct, 0.01, floor=0.3, ceiling=0.999)
    assert 0.3 < threshold < 0.999
    assert confident_error_share(confidence, correct, threshold) <= 0.01
    lower = np.nextafter(threshold, 0)
    assert confident_error_share(confidence, correct, lower) > 0.01


def test_the_threshold_stays_within_its_floor_and_ceiling():
    confidence = np.array([0.6, 0.7, 0.95, 0.99])
    assert choose_threshold(confidence, np.array([True, True, True, True]), 0.0, floor=0.5, ceiling=0.9) == 0.5
    # the most confident answer is wrong: nothing below the ceiling keeps it from being given as sure
    assert choose_threshold(confidence, np.array([True, True, True, False]), 0.0, floor=0.5, ceiling=0.9) == 0.9


def test_fitted_calibration_meets_its_target_on_the_images_it_was_fitted_on():
    logits, labels = _calibrated_logits(5000, seed=5, scale=6.0)
    params = ConfidenceParams(max_confident_error=0.01, min_threshold=0.3, max_threshold=0.999, default_threshold=0.9)
    calibration = fit_calibration(softmax(logits * 2), labels, params)
    assert calibration.validation is not None
    assert calibration.validation.confident_error_share <= 0.01
    figures = confidence_figures(calibration.apply(softmax(logits * 2)), labels, calibration.threshold)
    assert figures == calibration.validation
    assert figures.accuracy_sure > figures.accuracy and 0 < figures.unsure_share < 1


def test_figures_at_a_threshold():
    probabilities = np.zeros((4, 10))
    probabilities[np.arange(4), [1, 2, 3, 4]] = [0.99, 0.95, 0.6, 0.97]
    figures = confidence_figures(probabilities, np.array([1, 2, 3, 0]), threshold=0.9)
    # the third is unsure; of the three sure answers the last is wrong
    assert figures.accuracy == 0.75 and figures.unsure_share == 0.25
    assert figures.accuracy_sure == pytest.approx(2 / 3) and figures.confident_error_share == 0.25


def test_calibration_round_trips_and_defaults_without_a_hold_out():
    logits, labels = _calibrated_logits(500, seed=6)
    fitted = fit_calibration(softmax(logits), labels, ConfidenceParams())
    assert Calibration.from_dict(fitted.to_dict()) == fitted
    params = ConfidenceParams(default_threshold=0.8)
    assert fit_calibration(np.zeros((0, 10)), np.zeros(0, dtype=int), params) == Calibration.uncalibrated(params)
    bare = Calibration.uncalibrated(params)
    assert bare.temperature == 1.0 and bare.threshold == 0.8 and bare.images == 0
    assert Calibration.from_dict(bare.to_dict()) == bare
    assert bare.unsure(np.array([[0.79, 0.21], [0.8, 0.2]])).tolist() == [True, False]


def test_threshold_bounds_must_be_ordered():
    with pytest.raises(ValueError, match="min_threshold <= default_threshold"):
        ConfidenceParams(min_threshold=0.95, default_threshold=0.9)
