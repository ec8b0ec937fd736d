"""Watching production on a slice of MNIST: a champion from one retrain, its answers written to the real prediction
log (SQLite), and `digits monitor --json` through the real flow (Prefect), Evidently and MLflow.

The answers are the champion's own, given by the served form of the registered version, to MNIST training images
the slice never trained on: once as they are, once inverted (black ink on white, as an unconverted scan would come
through the pixels route).
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import digits
from pipeline import prediction_log, registry
from pipeline.settings import get_settings
from tests.conftest import TRAIN_IMAGES
from tests.integration.loop_fixtures import champion_answers

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_engine")]


def _monitor(window: str) -> dict:
    started = time.perf_counter()
    result = CliRunner().invoke(digits, ["monitor", "--window", window, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{\n") :])
    print(f"digits monitor --window {window}: {report['predictions']} answers in {time.perf_counter() - started:.1f} s")
    return report


def test_the_monitor_tells_answers_like_the_training_data_from_shifted_ones(project, mnist):
    from flows.retrain import retrain

    first = retrain()
    assert first["promoted"] and first["champion_version"] == "1", first["reasons"]

    # an hour with no answers: nothing to tell, and it says so
    quiet = _monitor("1h")
    assert quiet["predictions"] == 0 and quiet["drift"] is False and quiet["reference"] is None
    assert quiet["verdict"].startswith("too few predictions: 0 in the window, 200 needed")
    assert all(check["drift"] is None for check in quiet["checks"].values())

    # two days ago: 400 answers to digits like the training data, some of them corrected with their true digit
    unseen = slice(TRAIN_IMAGES, TRAIN_IMAGES + 400)
    request_ids = champion_answers(mnist.x_train[unseen], age=timedelta(days=2))
    engine = prediction_log.open_log(get_settings().prediction_log_url)
    statuses = [
        prediction_log.record_feedback(engine, request_id, int(label))["status"]
        for request_id, label in zip(request_ids[:30], mnist.y_train[unseen][:30], strict=True)
    ]
    calm = _monitor("3d")
    assert calm["predictions"] == 400 and calm["by_version"] == {"1": 400}
    assert calm["drift"] is False, json.dumps(calm["checks"], indent=1)
    assert calm["verdict"] == "no drift"
    # the reference: the champion on its own hold-out (10 % of the slice's 3,000 training images)
    assert calm["reference"]["version"] == "1" and calm["reference"]["images"] == 300
    assert calm["reference"]["source"] == "validation hold-out images"
    assert set(calm["checks"]) == {"predicted_class", "confidence", "unsure_share", "input_statistics", "feedback_accuracy"}
    assert calm["checks"]["input_statistics"]["drifted_share"] < 0.5
    accepted = statuses.count("accepted")
    assert calm["feedback_ready"] == accepted
    assert calm["checks"]["feedback_accuracy"]["versions"]["1"]["feedback"] == accepted
    assert calm["checks"]["feedback_accuracy"]["drift"] is None  # fewer than monitor.min_feedback corrections
    report = Path(calm["report"])
    assert report.parent.parent == project / "reports" / "monitoring"
    assert {"report.html", "evidently.html", "outputs.png", "inputs.png"} <= {p.name for p in report.parent.iterdir()}
    assert "Monitoring: no drift" in report.read_text()

    # the last hour: the same digits inverted; what the model is shown and what it says both move
    champion_answers(255 - mnist.x_train[unseen])
    alarm = _monitor("1h")
    assert alarm["predictions"] == 400 and alarm["drift"] is True, alarm["verdict"]
    checks = alarm["checks"]
    assert checks["input_statistics"]["drift"] and checks["input_statistics"]["columns"]["ink_share"]["drift"]
    assert checks["input_statistics"]["columns"]["ink_share"]["window_mean"] > 0.5  # mostly ink now
    assert checks["predicted_class"]["drift"] and checks["predicted_class"]["score"] < 0.01
    assert alarm["verdict"].startswith("drift: ") and "input_statistics" in alarm["verdict"]
    assert "Monitoring: DRIFT" in Path(alarm["report"]).read_text()

    # one MLflow run a call in digits-monitoring, the figures as metrics and the report as artifacts
    client = registry.connect(get_settings())
    experiment = client.get_experiment_by_name("digits-monitoring")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    assert [run.info.status for run in runs] == ["FINISHED"] * 3
    assert [run.info.run_id for run in runs] == [quiet["mlflow_run_id"], calm["mlflow_run_id"], alarm["mlflow_run_id"]]
    last = runs[-1].data
    assert last.metrics["drift"] == 1.0 and last.metrics["predictions"] == 400 and last.metrics["input_statistics_drift"] == 1.0
    assert last.metrics["ink_share_mean"] > 0.5 > last.metrics["reference_ink_share_mean"]
    assert last.params["window"] == "1h" and last.params["monitor.min_predictions"] == "200"
    assert last.tags["champion_version"] == "1"
    artifacts = {a.path for a in client.list_artifacts(alarm["mlflow_run_id"], "monitoring")}
    assert {"monitoring/report.html", "monitoring/evidently.html", "monitoring/report.json"} <= artifacts
    assert runs[0].data.metrics["drift"] == 0.0 and "predicted_class_drift" not in runs[0].data.metrics
