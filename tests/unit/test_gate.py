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


def paired_answers(n: int, only_candidate: int, only_champion: int, both_wrong: int = 0):
    """Test labels and two models' digits: who alone got which images right is set exactly."""
    y_true = np.arange(n) % 10
    candidate, champion = y_true.copy(), y_true.copy()
    wrong = lambda idx: (y_true[idx] + 1) % 10
    a = np.arange(only_champion)
    b = np.arange(only_champion, only_champion + only_candidate)
    c = np.arange(only_champion + only_candidate, only_champion + only_candidate + both_wrong)
    candidate[a], champion[b] = wrong(a), wrong(b)
    candidate[c], champion[c] = wrong(c), wrong(c)
    return y_true, candidate, champion


def test_mcnemar_counts_the_disagreements_and_gives_the_exact_one_sided_p_value():
    from scipy.stats import binom

    from pipeline.gate import Paired

    paired = Paired.compare(*paired_answers(1000, only_candidate=3, only_champion=12))
    assert (paired.only_candidate, paired.only_champion, paired.same_answers) == (3, 12, False)
    # P(at least 12 of the 15 disagreements go the champion's way | a fair coin)
    assert paired.p_value == pytest.approx(binom.sf(11, 15, 0.5))
    assert paired.p_value < 0.05
    assert Paired.compare(*paired_answers(1000, 0, 0)).p_value == 1.0
    assert Paired.compare(*paired_answers(1000, 8, 8)).p_value > 0.5
    with pytest.raises(ValueError, match="same test images"):
        Paired.compare(np.zeros(3), np.zeros(3), np.zeros(2))


def _scored(y_true, digits):
    return compute_metrics(y_true, digits)


def test_a_significant_drop_is_refused_and_the_reason_gives_the_counts_and_p():
    from pipeline.gate import Paired

    y, candidate, champion = paired_answers(1000, only_candidate=2, only_champion=14)
    strict = GateParams(min_accuracy=0.9, min_class_recall=0.8, max_accuracy_drop=0.0)
    decision = decide(_scored(y, candidate), strict, _scored(y, champion), "3", paired=Paired.compare(y, candidate, champion))
    assert not decision.promote
    [reason] = decision.reasons
    assert reason.startswith("not worse than champion")
    assert "only the candidate right on 2, only the champion on 14" in reason and "McNemar p = " in reason


def test_a_drop_that_is_not_significant_passes():
    from pipeline.gate import Paired

    y, candidate, champion = paired_answers(1000, only_candidate=5, only_champion=8)
    strict = GateParams(min_accuracy=0.9, min_class_recall=0.8, max_accuracy_drop=0.0)
    decision = decide(_scored(y, candidate), strict, _scored(y, champion), "3", paired=Paired.compare(y, candidate, champion))
    assert decision.promote, decision.reasons
    # the same counts without the pairing: any drop beyond the allowed one is refused
    assert not decide(_scored(y, candidate), strict, _scored(y, champion), "3").promote


def test_a_candidate_worse_only_on_the_photographed_family_is_refused():
    from pipeline.gate import Paired

    y, candidate, champion = paired_answers(1000, only_candidate=4, only_champion=4)
    gate = GateParams(min_accuracy=0.9, min_class_recall=0.8, max_family_drop={"photographed": 0.02})
    decision = decide(
        _scored(y, candidate),
        gate,
        _scored(y, champion),
        "3",
        paired=Paired.compare(y, candidate, champion),
        families={"photographed": 0.61, "rotated": 0.95},
        champion_families={"photographed": 0.70, "rotated": 0.90},
    )
    assert not decision.promote
    [reason] = decision.reasons
    assert (
        reason == "out of distribution, not worse than champion: photographed 0.6100 vs champion v3 0.7000 (allowed drop 0.0200)"
    )
    within = decide(_scored(y, candidate), gate, _scored(y, champion), "3", families={"photographed": 0.69},
                    champion_families={"photographed": 0.70})  # fmt: skip
    assert within.promote, within.reasons


def test_family_floors_name_the_families_below_them():
    gate = GateParams(min_accuracy=0.9, min_class_recall=0.8, min_family_accuracy={"photographed": 0.5, "inverted": 0.9})
    decision = decide(metrics_with(0.95), gate, families={"photographed": 0.42, "inverted": 0.97})
    assert not decision.promote
    assert decision.reasons == ["out-of-distribution floors: photographed 0.4200 vs floor 0.5000"]
    assert not decide(metrics_with(0.95), gate, families={"inverted": 0.97}).promote  # a floor without a score fails
    assert decide(metrics_with(0.95), gate, families={"photographed": 0.5, "inverted": 0.9}).promote


def test_a_retrain_that_changes_nothing_is_not_a_new_champion():
    from pipeline.gate import Paired

    y, same, _ = paired_answers(1000, 0, 0, both_wrong=20)
    paired = Paired.compare(y, same, same.copy())
    decision = decide(_scored(y, same), GATE, _scored(y, same), "1", paired=paired, same_setup=True)
    assert not decision.promote
    [reason] = decision.reasons
    assert reason.startswith("a change from the champion") and "same answer on all 1000 test images" in reason
    # other data or params: the same answers are a legitimate new version
    assert decide(_scored(y, same), GATE, _scored(y, same), "1", paired=paired, same_setup=False).promote


def test_family_thresholds_are_shares():
    with pytest.raises(ValueError, match="photographed: 1.5 is not a share"):
        GateParams(min_family_accuracy={"photographed": 1.5})
