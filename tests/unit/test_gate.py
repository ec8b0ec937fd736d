"""Every branch of the promotion gate."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluate import compute_metrics
from pipeline.gate import Check, decide
from pipeline.params import GateParams

GATE = GateParams(min_accuracy=0.9, min_class_recall=0.8, max_accuracy_drop=0.01)


def metrics_with(accuracy: float, weak_digit: int | None = None, weak_recall: float = 1.0, n: int = 1000):
    """Metrics whose accuracy is ``accuracy``; optionally one digit recalled at ``weak_recall``."""
    y_true = np.arange(n) % 10
    y_pred = y_true.copy()
    wrong = int(round(n * (1 - accuracy)))
    if weak_digit is not None:
        members = np.flatnonzero(y_true == weak_digit)
        misses = members[: int(round(len(members) * (1 - weak_recall)))]
        y_pred[misses] = (weak_digit + 1) % 10
        wrong -= len(misses)
    others = np.flatnonzero((y_pred == y_true) & (y_true != (weak_digit if weak_digit is not None else -1)))
    y_pred[others[: max(0, wrong)]] = (y_true[others[: max(0, wrong)]] + 1) % 10
    return compute_metrics(y_true, y_pred)


def test_first_model_that_clears_both_floors_is_promoted():
    decision = decide(metrics_with(0.95), GATE)
    assert decision.promote
    assert [c.name for c in decision.checks] == ["accuracy floor", "per-class recall floor"]
    assert "no champion yet" in decision.notes[0]


def test_accuracy_below_floor_is_rejected_with_the_figures():
    decision = decide(metrics_with(0.85), GATE)
    assert not decision.promote
    assert decision.reasons == ["accuracy floor: test accuracy 0.8500 vs floor 0.9000"]


def test_one_weak_class_is_rejected_naming_the_digit():
    decision = decide(metrics_with(0.95, weak_digit=3, weak_recall=0.5), GATE)
    assert not decision.promote
    [reason] = decision.reasons
    assert reason.startswith("per-class recall floor") and "digit 3" in reason and "0.5000" in reason


def test_candidate_within_the_allowed_drop_beats_the_champion():
    decision = decide(metrics_with(0.95), GATE, champion=metrics_with(0.955), champion_version="4")
    assert decision.promote
    assert decision.champion_version == "4" and decision.champion_accuracy == pytest.approx(0.955)


def test_candidate_worse_than_champion_beyond_the_margin_is_rejected():
    decision = decide(metrics_with(0.95), GATE, champion=metrics_with(0.97), champion_version="4")
    assert not decision.promote
    [reason] = decision.reasons
    assert reason.startswith("not worse than champion") and "v4 0.9700" in reason


def test_champion_scored_on_other_data_is_refused():
    with pytest.raises(ValueError, match="same test data"):
        decide(metrics_with(0.95), GATE, champion=metrics_with(0.95, n=500), champion_version="1")


def test_a_failed_smoke_check_rejects_an_otherwise_good_candidate():
    decision = decide(metrics_with(0.95), GATE).with_check(Check("smoke prediction from the registry", False, "load failed"))
    assert not decision.promote
    assert decision.reasons == ["smoke prediction from the registry: load failed"]
    assert "REJECT" in decision.to_markdown() and "| smoke prediction from the registry | FAIL |" in decision.to_markdown()


def test_decision_serialises_with_its_checks():
    record = decide(metrics_with(0.95), GATE).to_dict()
    assert record["promote"] is True and len(record["checks"]) == 2 and record["champion_version"] is None
