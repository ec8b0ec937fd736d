"""Watching production, the pure parts: windows, the verdict, Evidently's drift tests on constructed samples, the
window of a real SQLite log, and the thresholds in params.yaml."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO
from typer.testing import CliRunner

from pipeline import monitoring, prediction_log
from pipeline.image_stats import STATISTICS
from pipeline.params import MonitorParams, ParamsError, parse_params

PARAMS = MonitorParams()


def raw() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.mark.parametrize(
    ("text", "span"),
    [
        ("30m", timedelta(minutes=30)),
        ("24h", timedelta(hours=24)),
        ("7d", timedelta(days=7)),
        ("2w", timedelta(weeks=2)),
        ("1.5h", timedelta(minutes=90)),
        (" 12H ", timedelta(hours=12)),
    ],
)
def test_windows_are_a_number_and_a_unit(text, span):
    assert monitoring.parse_window(text) == span


@pytest.mark.parametrize("text", ["", "24", "h", "0h", "0.0d", "-1h", "24x", "1e3h", "24 hours", "1h30m"])
def test_a_bad_window_is_refused_saying_how_to_write_one(text):
    with pytest.raises(monitoring.WindowError, match="a window"):
        monitoring.parse_window(text)


def test_a_bad_window_stops_the_command_before_any_work(tmp_path, monkeypatch):
    from cli.main import digits

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(digits, ["monitor", "--window", "yesterday"])
    assert result.exit_code == 2 and "30m, 24h or 7d" in result.output
    assert list(tmp_path.iterdir()) == []


def test_the_verdict_claims_drift_only_over_enough_answers():
    flagged = {"predicted_class": {"drift": True}, "confidence": {"drift": False}, "feedback_accuracy": {"drift": None}}
    calm = {"predicted_class": {"drift": False}, "confidence": {"drift": False}, "feedback_accuracy": {"drift": None}}

    assert monitoring.verdict(flagged, predictions=500, min_predictions=200) == (True, "drift: predicted_class")
    assert monitoring.verdict(calm, predictions=500, min_predictions=200) == (False, "no drift")
    drift, why = monitoring.verdict(flagged, predictions=199, min_predictions=200)
    assert not drift and why.startswith("too few predictions: 199 in the window, 200 needed")
    unjudged = {name: {"drift": None} for name in monitoring.CHECKS}
    assert monitoring.verdict(unjudged, predictions=1000, min_predictions=200) == (False, "no drift")
    both = {**flagged, "unsure_share": {"drift": True}}
    assert monitoring.verdict(both, 500, 200) == (True, "drift: predicted_class, unsure_share")


def _answers(count: int, rng: np.random.Generator, shift: float = 0.0) -> pd.DataFrame:
    """Constructed answers: digits, confidence and input statistics; ``shift`` moves every distribution."""
    digits = rng.integers(0, 10, count) if not shift else rng.choice(10, count, p=[0.55] + [0.05] * 9)
    confidence = 1 - rng.beta(1, 30 * (1 - min(shift, 0.9)), count)
    statistics = {name: rng.normal(10 + (3 * shift), 2, count) for name in STATISTICS}
    frame = pd.DataFrame({"digit": digits, "confidence": confidence, "unsure": confidence < 0.9, **statistics})
    return monitoring._typed(frame)


def test_evidently_flags_a_shifted_window_and_not_a_window_like_the_reference():
    rng = np.random.default_rng(1)
    reference, window = _answers(2000, rng), _answers(500, rng)

    # a window of the same distributions: each test may err at its threshold's rate (1 %), no check should
    same = monitoring.column_drift(reference, window, PARAMS)
    assert set(same) == {"digit", "confidence", *STATISTICS}
    assert sum(column["drift"] for column in same.values()) <= 1, same
    assert same["digit"]["method"] == "chi2_contingency" and same["confidence"]["method"] == "ks"
    checks = monitoring.output_and_input_checks(reference, window, same, PARAMS)
    assert {name: check["drift"] for name, check in checks.items()} == dict.fromkeys(
        ("predicted_class", "confidence", "unsure_share", "input_statistics"), False
    )

    shifted_window = _answers(500, rng, shift=0.5)
    shifted = monitoring.column_drift(reference, shifted_window, PARAMS)
    assert all(column["drift"] and column["score"] < PARAMS.num_threshold for column in shifted.values()), shifted
    checks = monitoring.output_and_input_checks(reference, shifted_window, shifted, PARAMS)
    assert all(check["drift"] for check in checks.values()), checks
    assert checks["input_statistics"]["drifted"] == list(STATISTICS)
    assert checks["unsure_share"]["increase"] > PARAMS.max_unsure_increase


def test_the_digit_test_holds_its_false_alarm_rate_with_a_window_larger_than_the_reference():
    # Evidently's own chi-square takes the reference's shares as exact and flags most such windows of the same digits
    rng = np.random.default_rng(1)
    monitoring._evidently()
    from evidently.legacy.calculations.stattests.registry import get_registered_stattest
    from evidently.legacy.core import ColumnType

    ours = get_registered_stattest("chi2_contingency", ColumnType.Categorical)
    theirs = get_registered_stattest("chisquare", ColumnType.Categorical)
    draws = [(pd.Series(rng.integers(0, 10, 300)), pd.Series(rng.integers(0, 10, 3000))) for _ in range(100)]
    assert sum(ours(r, c, ColumnType.Categorical, 0.05).drifted for r, c in draws) <= 12  # about 5 expected
    assert sum(theirs(r, c, ColumnType.Categorical, 0.05).drifted for r, c in draws) >= 40


def test_reference_answers_are_recorded_as_the_service_records_them():
    probabilities = np.full((3, 10), 0.01)
    probabilities[0, 7], probabilities[1, 2], probabilities[2, 4] = 0.91, 0.5, 0.8999999
    images = np.zeros((3, 28, 28), np.uint8)
    images[0, 4:24, 12:16] = 255
    frame = monitoring.answers_frame(probabilities, 0.9, images)
    assert frame["digit"].tolist() == [7, 2, 4]
    assert frame["unsure"].tolist() == [False, True, True]  # decided before the rounding, as the service does
    assert frame["confidence"].tolist() == [0.91, 0.5, 0.9]
    assert frame.loc[0, "box_top"] == 4 and frame.loc[1, "ink_share"] == 0 and frame.loc[1, "box_top"] == -1


def test_accuracy_on_feedback_is_judged_only_from_enough_corrections():
    params = MonitorParams(min_feedback=50, min_feedback_accuracy=0.9)
    few = monitoring.feedback_check({"1": {"feedback": 49, "correct": 10, "accuracy": 10 / 49}}, params)
    assert few["drift"] is None
    check = monitoring.feedback_check(
        {"1": {"feedback": 60, "correct": 57, "accuracy": 0.95}, "2": {"feedback": 80, "correct": 60, "accuracy": 0.75}}, params
    )
    assert check["drift"] is True and check["below_floor"] == ["2"]
    assert monitoring.feedback_check({}, params)["drift"] is None


@pytest.fixture
def engine(tmp_path):
    engine = prediction_log.open_log(f"sqlite:///{tmp_path / 'predictions.db'}")
    yield engine
    engine.dispose()


def _logged(engine, answers: list[tuple[str, int, float]], age: timedelta) -> list[str]:
    """Log (version, digit, confidence) answers as given ``age`` ago; their request ids."""
    writer = prediction_log.LogWriter(engine).start()
    made_up = []
    for version, digit, confidence in answers:
        probabilities = [0.0] * 10
        probabilities[digit] = confidence
        answer = {"digit": digit, "confidence": confidence, "unsure": confidence < 0.9, "probabilities": probabilities}
        made_up.append(answer | {"model_name": "digits-cnn", "model_version": version, "run_id": "r"})
    ids = [prediction_log.new_request_id() for _ in made_up]
    images = np.zeros((len(made_up), 28, 28))
    writer.submit(prediction_log.answered(ids, "pixels", made_up, "tflite", images, at=prediction_log.utc_now() - age))
    writer.close()
    return ids


def test_the_window_reads_only_its_answers_and_their_corrections(engine):
    old = _logged(engine, [("1", 3, 0.99)] * 4, age=timedelta(days=3))
    recent = _logged(engine, [("1", 3, 0.99), ("1", 5, 0.6), ("2", 7, 0.95), ("10", 7, 0.92), ("2", 4, 0.99)], timedelta(hours=1))
    for request_id, label in zip([*recent[:4], old[0]], [3, 6, 7, 1, 3], strict=True):
        prediction_log.record_feedback(engine, request_id, label)
    # held for review (it contradicts a confident answer): not a trusted label, so not counted
    assert prediction_log.record_feedback(engine, recent[4], 9)["status"] == "quarantined"

    until = prediction_log.utc_now()
    window = monitoring.read_window(engine, until - timedelta(hours=24), until)
    assert len(window) == 5 and window["model_version"].tolist() == ["1", "1", "2", "10", "2"]
    assert window["digit"].tolist() == [3, 5, 7, 7, 4] and window["unsure"].tolist() == [False, True, False, False, False]
    assert window.dtypes["confidence"] == "float64" and set(STATISTICS) <= set(window.columns)

    by_version = prediction_log.accuracy_by_version(engine, until - timedelta(hours=24), until, accepted_only=True)
    assert list(by_version) == ["1", "2", "10"]  # versions in number order
    assert by_version["1"] == {"feedback": 2, "correct": 1, "accuracy": 0.5}
    assert by_version["2"] == {"feedback": 1, "correct": 1, "accuracy": 1.0} and by_version["10"]["correct"] == 0
    assert prediction_log.ready_count(engine) == 5  # the whole log: every accepted correction not harvested
    assert len(monitoring.read_window(engine, until - timedelta(minutes=30), until)) == 0


def test_the_report_flattens_into_metrics_and_a_page(tmp_path):
    rng = np.random.default_rng(2)
    reference, window = _answers(400, rng), _answers(300, rng)
    checks = monitoring.output_and_input_checks(reference, window, monitoring.column_drift(reference, window, PARAMS), PARAMS)
    checks["feedback_accuracy"] = monitoring.feedback_check({"3": {"feedback": 5, "correct": 4, "accuracy": 0.8}}, PARAMS)
    drift, why = monitoring.verdict(checks, 300, PARAMS.min_predictions)
    report = {
        "drift": drift,
        "verdict": why,
        "window": "24h",
        "since": "2026-01-01T00:00:00",
        "until": "2026-01-02T00:00:00",
        "predictions": 300,
        "by_version": {"3": 300},
        "feedback_ready": 4,
        "min_feedback_to_retrain": 500,
        "reference": None,
        "checks": checks,
    }
    figures = monitoring.figures(report)
    assert figures["drift"] == 0.0 and figures["predictions"] == 300 and figures["feedback_accuracy_v3"] == 0.8
    assert "feedback_accuracy_drift" not in figures  # not judged: no number pretends it was
    assert {"digit_0_share", "reference_digit_0_share", "confidence_score", "ink_share_score", "unsure_share"} <= set(figures)

    monitoring.write_summary(tmp_path / "report.html", report, ["outputs.png"], "evidently.html")
    page = (tmp_path / "report.html").read_text()
    assert "Monitoring: no drift" in page and "href='evidently.html'" in page and "v3: 4 of 5 right" in page

    from app.monitoring import render, to_markdown

    report |= {"report": str(tmp_path / "report.html"), "mlflow_run_id": "abc"}
    table, markdown = render(report), to_markdown(report)
    assert table.startswith("verdict          no drift\n") and "input_statistics   ok" in table
    assert "| feedback_accuracy | not judged | v3: 4 of 5 right (80.0%)" in markdown


def test_the_monitor_section_is_strict():
    assert parse_params(raw()).monitor == MonitorParams()  # params.yaml holds the defaults
    bad = raw()
    bad["monitor"]["drift_shares"] = 0.5
    with pytest.raises(ParamsError, match=r"monitor\.drift_shares: unknown key"):
        parse_params(bad)
    with pytest.raises(ParamsError, match=r"monitor\.num_stattest"):
        parse_params(raw(), {"monitor.num_stattest": "chi2_contingency"})  # a test for categories, not numbers
    with pytest.raises(ParamsError, match=r"monitor\.drift_share"):
        parse_params(raw(), {"monitor.drift_share": 0})


def test_a_retrain_starts_on_drift_or_on_enough_corrections():
    from pipeline.monitoring import retrain_reason

    assert retrain_reason(True, 0, 500) == "drift"
    assert retrain_reason(True, 900, 500) == "drift"  # drift names the run even when corrections are ready too
    assert retrain_reason(False, 500, 500) == "feedback"
    assert retrain_reason(False, 499, 500) is None
