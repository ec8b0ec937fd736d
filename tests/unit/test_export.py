"""Comparing a model's export with the model: the rule that decides whether the export is served."""

import numpy as np
import pytest

from pipeline.export import MAX_PROBABILITY_DIFFERENCE, agreement


def _probabilities(digits: list[int], confidence: float = 0.91) -> np.ndarray:
    rows = np.full((len(digits), 10), (1 - confidence) / 9)
    rows[np.arange(len(digits)), digits] = confidence
    return rows


def test_identical_answers_agree():
    expected = _probabilities([3, 1, 4, 1, 5])
    check = agreement(expected, expected.copy())
    assert check.ok and check.same_digits == check.images == 5 and check.max_probability_difference == 0
    assert "5 of 5 images" in check.summary()


def test_float_noise_below_the_limit_agrees():
    expected = _probabilities([0, 9])
    check = agreement(expected, expected + MAX_PROBABILITY_DIFFERENCE / 2)
    assert check.ok and check.max_probability_difference == pytest.approx(MAX_PROBABILITY_DIFFERENCE / 2)


def test_one_different_digit_disagrees():
    expected = _probabilities([2, 7, 7])
    check = agreement(expected, _probabilities([2, 7, 1]))
    assert not check.ok and check.same_digits == 2 and check.to_dict()["ok"] is False


def test_same_digits_with_drifted_probabilities_disagree():
    expected = _probabilities([6, 8])
    check = agreement(expected, _probabilities([6, 8], confidence=0.9))
    assert check.same_digits == 2 and not check.ok


def test_without_a_probability_limit_only_the_digits_count():
    """The int8 export's rule: probabilities a few points off are fine, a different digit is not."""
    expected = _probabilities([6, 8])
    drifted = agreement(expected, _probabilities([6, 8], confidence=0.8), probability_limit=None)
    assert drifted.ok and drifted.max_probability_difference == pytest.approx(0.11)
    assert "only digits must agree" in drifted.summary() and drifted.to_dict()["probability_limit"] is None
    assert not agreement(expected, _probabilities([6, 3]), probability_limit=None).ok


def test_shapes_must_match():
    with pytest.raises(ValueError, match=r"shapes \(2, 10\) and \(3, 10\)"):
        agreement(_probabilities([1, 2]), _probabilities([1, 2, 3]))
