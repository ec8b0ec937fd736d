"""The sweep flow for real: a local Dask cluster, the Prefect engine, the MLflow store, DVC, on a slice of MNIST."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from pipeline import registry
from pipeline.settings import get_settings

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_engine")]

# small nets, so that two trainings, their workers and the gate fit in about a minute; the two learning
# rates are far apart, so that the validation scores differ clearly (about 0.55 and 0.90 on the slice)
LEARNING_RATES = [0.0002, 0.005]
OVERRIDES = {
    "model.conv_filters": [16, 32],
    "model.dense_units": 32,
    "model.batch_norm": False,  # with batch norm, two short epochs leave the moving statistics unsettled
    "model.dropout": 0.3,  # the rest of the net pinned as measured, whatever params.yaml's defaults become
    "model.augment_shift": 0.1,
    "train.epochs": 2,
    "train.batch_size": 64,
    "gate.min_accuracy": 0.5,
    "gate.min_class_recall": 0.0,
    "sweep.grid": {"train.learning_rate": LEARNING_RATES},
}


def test_candidates_train_in_parallel_and_the_best_on_validation_is_gated_and_promoted(project, monkeypatch):
    from flows.sweep import sweep

    monkeypatch.delenv("DIGITS_DASK_ADDRESS", raising=False)
    summary = sweep(overrides=OVERRIDES, allow_unsafe_overrides=True)  # its floors are lowered for two short epochs

    client: MlflowClient = registry.connect(get_settings())
    experiment = client.get_experiment_by_name(get_settings().experiment).experiment_id
    parent = client.get_run(summary["sweep_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["kind"] == "sweep"
    assert json.loads(parent.data.params["sweep.grid"]) == OVERRIDES["sweep.grid"]

    # every candidate is its own run, nested under the sweep, with its params and validation metrics
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2
    assert sorted(float(run.data.params["train.learning_rate"]) for run in children) == LEARNING_RATES
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.params["model.conv_filters"] == "[16, 32]" and run.data.params["data_version"]
        assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 2
        assert run.data.metrics["final_val_accuracy"] == client.get_metric_history(run.info.run_id, "val_accuracy")[-1].value
    # each trained in a Dask worker process of its own: in parallel, not one after the other
    workers = {run.data.tags["dask_worker"] for run in children}
    assert len(workers) == 2 and all(w.startswith("tcp://127.0.0.1:") for w in workers), workers

    # the choice is the better validation accuracy; only the chosen one ever met the test set
    best = max(children, key=lambda run: run.data.metrics["final_val_accuracy"])
    other = next(run for run in children if run.info.run_id != best.info.run_id)
    assert best.data.metrics["final_val_accuracy"] > other.data.metrics["final_val_accuracy"]
    assert summary["run_id"] == best.info.run_id == parent.data.tags["best_run_id"]
    assert "test_accuracy" not in other.data.metrics and "gate" not in other.data.tags
    assert other.data.tags["sweep_selected"] == "false"
    chosen = client.get_run(best.info.run_id)
    assert chosen.data.tags["sweep_selected"] == "true" and chosen.data.tags["gate"] == "promote"
    assert chosen.data.metrics["test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-5)
    assert {"plots/learning_curves.png", "plots/confusion_matrix.png"} <= {
        a.path for a in client.list_artifacts(best.info.run_id, "plots")
    }

    # the gate and promotion of the retrain flow: registered from the chosen run, champion moved to it
    assert summary["promoted"], summary["reasons"]
    assert summary["registered_version"] == summary["champion_version"] == "1"
    champion = registry.get_alias(client, get_settings().model_name)
    assert champion.version == "1" and champion.run_id == best.info.run_id
    assert champion.data_version == summary["data_version"] and champion.promoted_at
    # the overrides, lowered floors included, on the sweep's run, every candidate's and the version
    for run in (parent, *children):
        assert json.loads(run.data.tags["overrides"]) == json.loads(json.dumps(OVERRIDES)), run.info.run_id
        assert run.data.tags["unsafe_overrides"] == "gate.min_accuracy, gate.min_class_recall, sweep.grid"
    assert champion.overrides == json.loads(json.dumps(OVERRIDES)) and champion.verdict == "promote"
    assert parent.data.tags["promoted_version"] == "1" and parent.data.tags["gate"] == "promote"
    assert [r["selected"] for r in summary["candidates"]].count(True) == 1
    table = json.loads(open(client.download_artifacts(parent.info.run_id, "sweep/candidates.json")).read())
    assert len(table["data"]) == 2 and best.info.run_id in json.dumps(table)
