"""The real retraining flow (Prefect engine, MLflow sqlite store, DVC) on a slice of real MNIST."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from app import data
from pipeline import registry, tracking
from pipeline.params import load_params
from pipeline.settings import get_settings
from pipeline.validation import DataValidationError

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_engine")]


def _retrain(**overrides):
    """A local run, as `digits retrain --set ... --allow-unsafe-overrides` starts it."""
    from flows.retrain import retrain

    return retrain(overrides=overrides or None, allow_unsafe_overrides=True)


def _client() -> MlflowClient:
    return registry.connect(get_settings())


def test_first_run_promotes_and_worse_runs_leave_the_champion(project):
    first = _retrain()
    assert first["promoted"], first["reasons"]
    assert first["champion_version"] == first["registered_version"] == "1"
    assert first["test_accuracy"] >= 0.8

    client = _client()
    run = client.get_run(first["run_id"])
    assert run.info.status == "FINISHED"
    # the run records the data version (DVC hash in data.dvc) and the code version
    pointer = (project / "data.dvc").read_text()
    assert run.data.tags["data_version"] == first["data_version"] and first["data_version"] in pointer
    assert run.data.tags["git_commit"] and run.data.tags["trigger"] == first["trigger"] == "manual"
    assert "val_accuracy" in run.data.metrics and len(client.get_metric_history(run.info.run_id, "loss")) == 3
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"plots", "validation_report", "gate", "evaluation"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/learning_curves.png", "plots/confusion_matrix.png", "plots/misclassified.png"} <= plots
    # the serving exports: checked against the Keras model on the whole test set, kept when they agree
    exported = {a.path for a in client.list_artifacts(run.info.run_id, "serving")}
    assert {"serving/model.tflite", "serving/agreement.json", "serving/agreement-int8.json"} <= exported
    agreement = json.loads(Path(client.download_artifacts(run.info.run_id, "serving/agreement.json")).read_text())
    assert agreement["ok"] and agreement["same_digits"] == agreement["images"] > 0
    int8 = json.loads(Path(client.download_artifacts(run.info.run_id, "serving/agreement-int8.json")).read_text())
    assert int8["probability_limit"] is None and int8["ok"] == (int8["same_digits"] == int8["images"] > 0)
    assert ("serving/model-int8.tflite" in exported) == int8["ok"]
    assert run.data.tags["serving_runtime"] == ("tflite-int8" if int8["ok"] else "tflite")
    assert registry.load_tflite(run.info.run_id)[4:8] == b"TFL3"  # what the service downloads
    # the calibration fitted on the validation hold-out, kept beside the exports, and what it does on the test set
    assert {"plots/reliability.png", "plots/reliability_validation.png"} <= plots
    calibration = registry.load_calibration(run.info.run_id)
    assert calibration is not None and calibration.images > 0 and calibration.temperature > 0
    # meets its target on the hold-out, unless even the ceiling could not
    assert 0.5 <= calibration.threshold <= 0.999
    assert calibration.validation.confident_error_share <= 0.002 or calibration.threshold == 0.999
    metrics = run.data.metrics
    for name in ("val_ece", "test_ece", "test_ece_calibrated", "temperature", "unsure_threshold", "test_accuracy_sure"):
        assert name in metrics, name
    assert metrics["unsure_threshold"] == calibration.threshold
    assert 0 <= metrics["test_confident_error_share"] <= 1 - metrics["test_accuracy"]
    assert 0 <= metrics["test_unsure_share"] < 1 and metrics["test_accuracy_sure"] >= metrics["test_accuracy"] - 0.01

    champion = registry.get_alias(client, get_settings().model_name)
    assert champion.version == "1" and champion.data_version == first["data_version"] and champion.promoted_at
    # params.yaml as it is: no overrides, recorded as such on the run and the version, with the gate's verdict
    assert run.data.tags["overrides"] == "{}" and champion.overrides == {} and champion.verdict == "promote"
    # a champion promoted before verdicts were recorded (the service refuses it) is re-checked where it stands
    from app import promotion

    name = get_settings().model_name
    for tag in (registry.VERDICT_TAG, registry.HASHES_TAG):
        client.delete_model_version_tag(name, "1", tag)
    settings, params = get_settings(), load_params(get_settings().params_path)
    rechecked = promotion.override(settings, params, "1")
    assert rechecked.decision.promote and rechecked.champion.version == "1"
    again = registry.get_version(client, name, "1")
    assert again.verdict == "promote" and again.served_sha256 == champion.served_sha256
    with pytest.raises(registry.PromotionError, match="already the champion"):
        promotion.override(settings, params, "1")

    # the gate scored the served form on the out-of-distribution suite: every family, a table and a chart
    from pipeline.suite import FAMILY_NAMES

    assert "plots/suite.png" in plots
    suite = json.loads(Path(client.download_artifacts(run.info.run_id, "evaluation/suite.json")).read_text())
    assert set(suite["families"]) == set(FAMILY_NAMES) and suite["runtime"] == run.data.tags["serving_runtime"]
    assert all(0 <= metrics[f"suite_{name}_accuracy"] <= 1 for name in FAMILY_NAMES)
    assert {"mnist", "photographed"} <= set(suite["confidence"])
    # `digits evaluate` scores the champion the same way, from the cached suite
    from typer.testing import CliRunner

    from cli.main import digits

    result = CliRunner().invoke(digits, ["evaluate", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["version"] == "1" and report["families"] == suite["families"] and report["mnist"] == suite["mnist"]
    assert report["mnist"] == pytest.approx(metrics["served_test_accuracy"], abs=1e-5)
    missing = CliRunner().invoke(digits, ["evaluate", "7"])
    assert missing.exit_code == 1 and "has no version 7" in missing.output

    # a floor override without the flag is refused before anything starts
    from flows.retrain import retrain
    from pipeline.params import OverrideRefused

    with pytest.raises(OverrideRefused, match="gate.min_accuracy refused.*--allow-unsafe-overrides"):
        retrain(overrides={"gate.min_accuracy": 0.0, "train.epochs": 1})

    # an impossible floor: nothing is promoted, the reason names the floor; the override is on the run
    strict = _retrain(**{"gate.min_accuracy": 1.0})
    assert not strict["promoted"] and strict["registered_version"] is None
    strict_tags = client.get_run(strict["run_id"]).data.tags
    assert (
        json.loads(strict_tags["overrides"]) == {"gate.min_accuracy": 1.0}
        and strict_tags["unsafe_overrides"] == "gate.min_accuracy"
    )
    assert any("accuracy floor" in reason for reason in strict["reasons"])

    # a clearly worse model clears the floors but loses to the champion re-scored on the same data
    worse = _retrain(**{"train.epochs": 1, "train.learning_rate": 1e-5, "gate.min_accuracy": 0.0, "gate.min_class_recall": 0.0})
    assert not worse["promoted"]
    assert any("not worse than champion" in reason for reason in worse["reasons"])
    assert registry.get_alias(client, get_settings().model_name).version == "1"
    gate_file = client.download_artifacts(worse["run_id"], "gate/gate_decision.json")
    assert json.loads(open(gate_file).read())["champion_version"] == "1"


def test_poisoned_data_is_stopped_by_validation(project, mnist_slice):
    data.prepare(get_settings(), load_params(get_settings().params_path))
    labels_file = project / "data" / "mnist" / "train_labels.npy"
    labels = np.load(labels_file)
    labels[labels == 7] = 11  # a label outside 0-9, and digit 7 goes missing
    np.save(labels_file, labels)

    with pytest.raises(DataValidationError) as raised:
        _retrain()
    message = str(raised.value)
    assert "11" in message and "label" in message

    client = _client()
    [run] = client.search_runs([client.get_experiment_by_name(get_settings().experiment).experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["stopped_at"] == "validation"
    assert client.search_registered_models() == []  # nothing trained, nothing registered


def test_crash_mid_training_marks_the_run_failed_and_keeps_the_champion(project, monkeypatch):
    first = _retrain()
    assert first["promoted"], first["reasons"]

    def crash(run_id, epoch, values):
        raise RuntimeError("simulated crash in epoch 1")

    log_epoch = tracking.log_epoch
    monkeypatch.setattr(tracking, "log_epoch", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _retrain()
    client = _client()
    runs = client.search_runs(
        [client.get_experiment_by_name(get_settings().experiment).experiment_id], order_by=["attributes.start_time DESC"]
    )
    assert runs[0].info.status == "FAILED"
    assert registry.get_alias(client, get_settings().model_name).version == first["champion_version"]

    monkeypatch.setattr(tracking, "log_epoch", log_epoch)
    # the next run works; same data, seed and params give the same model, which changes nothing
    again = _retrain()
    assert again["test_accuracy"] == first["test_accuracy"]
    assert not again["promoted"] and again["registered_version"] is None and again["champion_version"] == "1"
    assert any(reason.startswith("a change from the champion: the same data version and params") for reason in again["reasons"])


def test_a_source_failing_its_checksum_stops_the_flow_before_any_version(project, slice_npz):
    from typer.testing import CliRunner

    from cli.main import digits

    params_file = project / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["data"].update(source="keras-url", keras_url={"url": slice_npz.as_uri(), "sha256": "0" * 64})
    params_file.write_text(yaml.safe_dump(params))

    result = CliRunner().invoke(digits, ["retrain"])
    assert result.exit_code == 1
    assert "checksum mismatch" in result.output and "Nothing was trained or promoted" in result.output
    assert not (project / "data.dvc").exists() and not (project / "data").exists()
