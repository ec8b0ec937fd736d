"""The retraining flow: version -> validate -> train -> gate -> register/promote, one task a step.

Tasks are thin calls into ``pipeline.steps``; they pass run ids and small values, never arrays.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pipeline import steps, versioning
from pipeline.params import Params, load_params
from pipeline.settings import Settings, get_settings
from pipeline.validation import DataValidationError
from pipeline.versioning import DataVersion

# inputs are settings and params objects: nothing worth hashing for a cache
_task = dict(cache_policy=NO_CACHE)


@task(name="version dataset (DVC)", retries=2, retry_delay_seconds=5, **_task)
def version_data(settings: Settings, params: Params) -> DataVersion:
    return steps.prepare_data(settings, params)


@task(name="open MLflow run", retries=2, retry_delay_seconds=2, **_task)
def open_run(settings: Settings, params: Params, data_version: DataVersion) -> str:
    return steps.start_run(settings, params, data_version, run_name=f"retrain-{data_version.short}")


@task(name="validate dataset (Great Expectations)", **_task)
def validate(settings: Settings, params: Params, run_id: str) -> dict:
    return steps.validate(settings, params, run_id).statistics


@task(name="train and evaluate (Keras)", **_task)
def train(settings: Settings, params: Params, run_id: str) -> steps.Candidate:
    return steps.train_candidate(settings, params, run_id)


@task(name="gate against floors and champion", **_task)
def gate(settings: Settings, params: Params, candidate: steps.Candidate):
    return steps.gate(settings, params, candidate)


# Runs on several workers share one Prefect server: `digits deploy` gives this tag a concurrency limit of 1, so
# only one promote task runs at a time across workers (the file lock in the registry only covers one machine).
# With no limit on the server (the embedded set-up) the tag costs one API call and never waits.
PROMOTION_TAG = "digits-promotion"


@task(name="register and promote (MLflow registry)", tags=[PROMOTION_TAG], retries=1, retry_delay_seconds=5, **_task)
def promote(settings: Settings, candidate: steps.Candidate, decision, data_version: str) -> steps.Outcome:
    return steps.promote(settings, candidate, decision, data_version)


@task(name="record the run in dvc.lock", retries=1, retry_delay_seconds=2, **_task)
def lock_stages(settings: Settings, candidate: steps.Candidate, decision) -> bool:
    steps.write_reports(settings, candidate, decision)
    return versioning.lock_stages(settings.home)


def summarize(data_version: DataVersion, run_id: str, outcome: steps.Outcome, candidate: steps.Candidate) -> dict[str, Any]:
    champion = outcome.champion
    return {
        "data_version": data_version.md5,
        "run_id": run_id,
        "test_accuracy": round(candidate.metrics.accuracy, 5),
        "test_min_class_recall": round(candidate.metrics.min_class_recall, 5),
        "promoted": outcome.decision.promote,
        "reasons": outcome.decision.reasons,
        "registered_version": outcome.registered.version if outcome.registered else None,
        "champion_version": champion.version if champion else None,
    }


@flow(name="retrain-digits", log_prints=True)
def retrain(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Retrain on the current data version and promote the result if it passes the gate.

    ``overrides`` maps dotted params keys to values, e.g. ``{"train.epochs": 1}``.
    """
    settings = get_settings()
    params = load_params(settings.params_path, overrides)
    data_version = version_data(settings, params)
    run_id = open_run(settings, params, data_version)
    try:
        validate(settings, params, run_id)
        candidate = train(settings, params, run_id)
        decision = gate(settings, params, candidate)
        outcome = promote(settings, candidate, decision, data_version.md5)
    except DataValidationError as err:
        steps.finish_run(settings, run_id, failed=True, stopped_at="validation")
        create_markdown_artifact(err.report.summary(), key="data-validation", description="why the flow stopped")
        raise
    except BaseException:
        steps.finish_run(settings, run_id, failed=True, stopped_at="training or promotion")
        raise
    steps.finish_run(settings, run_id)
    if not overrides:  # with overrides the run no longer matches params.yaml, which dvc.lock records
        lock_stages(settings, candidate, outcome.decision)
    create_markdown_artifact(outcome.decision.to_markdown(), key="gate-decision", description="promotion gate")
    summary = summarize(data_version, run_id, outcome, candidate)
    print(render_summary(summary))
    return summary


def render_summary(summary: dict[str, Any]) -> str:
    verdict = f"PROMOTED v{summary['registered_version']}" if summary["promoted"] else "NOT promoted"
    lines = [
        f"data version   {summary['data_version']}",
        f"MLflow run     {summary['run_id']}",
        f"test accuracy  {summary['test_accuracy']:.4f} (lowest class recall {summary['test_min_class_recall']:.4f})",
        f"gate           {verdict}",
        *[f"               - {reason}" for reason in summary["reasons"]],
        f"champion       {'v' + summary['champion_version'] if summary['champion_version'] else 'none'}",
    ]
    return "\n".join(lines)
