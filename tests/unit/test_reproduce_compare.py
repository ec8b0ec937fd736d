"""The verdict of a reproduction: identical, equal within tolerance where the machine differs, or different with a cause."""

from __future__ import annotations

import numpy as np

from pipeline import reproduce

WEIGHTS = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(3, np.float32)]
ANSWERS = np.array([7, 2, 1, 0, 4])
MACHINE = {"tensorflow": "2.20.0", "cpu_sets": "avx512f avx2 fma", "threads": "2"}


def _compare(weights=WEIGHTS, answers=ANSWERS, accuracies=(0.95, 0.95), machine=MACHINE):
    return reproduce.compare(WEIGHTS, weights, ANSWERS, answers, accuracies, (MACHINE, machine))


def test_the_same_weights_are_identical():
    found = _compare([w.copy() for w in WEIGHTS])
    assert found.verdict == "identical" and found.reproduced and found.weights_identical
    assert found.max_weight_difference == 0 and found.answers_differing == 0 and found.likely_cause is None


def test_rounding_on_another_machine_is_equal_within_tolerance_and_named():
    nudged = [WEIGHTS[0] + 1e-7, WEIGHTS[1]]
    found = _compare(nudged, machine={**MACHINE, "cpu_sets": "avx2 fma", "threads": "8"})
    assert found.verdict == "equal within tolerance" and found.reproduced and not found.weights_identical
    assert found.environment_differences == {"cpu_sets": ("avx512f avx2 fma", "avx2 fma"), "threads": ("2", "8")}
    assert "cpu_sets, threads" in found.likely_cause
    assert "machine: threads was 2, now 8" in found.summary()


def test_other_answers_are_different_even_on_another_machine():
    found = _compare([WEIGHTS[0] + 0.5, WEIGHTS[1]], np.array([7, 2, 1, 0, 9]), (0.95, 0.94), {**MACHINE, "threads": "8"})
    assert found.verdict == "different" and not found.reproduced and found.answers_differing == 1
    assert found.max_weight_difference == 0.5


def test_other_weights_on_the_same_machine_point_at_nondeterminism():
    found = _compare([WEIGHTS[0] + 1e-7, WEIGHTS[1]])
    assert found.verdict == "different" and "not deterministic" in found.likely_cause


def test_another_architecture_is_named():
    found = _compare([WEIGHTS[0]])
    assert found.verdict == "different" and found.max_weight_difference == float("inf")
    assert "another architecture" in found.likely_cause


def test_the_machine_is_recorded_as_run_tags_and_read_back():
    found = reproduce.environment()
    assert {"python", "tensorflow", "keras", "numpy", "cpu_sets", "threads", "machine"} <= set(found)
    assert int(found["threads"]) >= 1
    tags = reproduce.as_tags(found) | {"git_commit": "abc"}
    assert reproduce.from_tags(tags) == found
