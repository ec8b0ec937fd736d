"""The retraining flow: version -> validate -> train -> gate -> register/promote, one Prefect task a use case."""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from app import data, promotion, recovery, stages, summaries, training
from app.promotion import Outcome
from app.training import Candidate
from pipeline import tracking
from pipeline.gate import GateDecision
from pipeline.params import Params, check_overrides, load_params
from pipeline.settings import Settings, get_settings
from pipeline.validation import DataValidationError
from pipeline.versioning import DataVersion

# inputs are settings and params objects: nothing worth hashing for a cache
_task = dict(cache_policy=NO_CACHE)

# `digits deploy` gives this tag a concurrency limit of 1 on the Prefect server, so that one promote task runs
# at a time across workers; with no limit on the server (the embedded set-up) it never waits
PROMOTION_TAG = "digits-promotion"
# what starts a retrain: a person, the deployment's schedule, or the monitor (drift, or enough new feedback)
Trigger = Literal["manual", "schedule", "drift", "feedback"]


@task(name="recover from killed runs", **_task)
def recover(settings: Settings) -> list[str]:
    return recovery.recover(settings)


@task(name="version dataset (DVC)", retries=2, retry_delay_seconds=5, **_task)
def version_data(settings: Settings, params: Params) -> DataVersion:
    return data.prepare(settings, params)


@task(name="open MLflow run", retries=2, retry_delay_seconds=2, **_task)
def open_run(
    settings: Settings, params: Params, data_version: DataVersion, trigger: Trigger, overrides: dict[str, Any] | None = None
) -> str:
    tags = {"trigger": trigger, **tracking.override_tags(overrides)}
    return tracking.start_run(settings, params, data_version, run_name=f"retrain-{data_version.short}", tags=tags)


@task(name="validate dataset (Great Expectations)", **_task)
def validate(settings: Settings, params: Params, run_id: str) -> dict:
    try:
        return data.validate(settings, params, run_id).statistics
    except DataValidationError as err:
        create_markdown_artifact(err.report.summary(), key="data-validation", description="why the flow stopped")
        raise


@task(name="train and evaluate (Keras)", **_task)
def train(settings: Settings, params: Params, run_id: str) -> Candidate:
    return training.train_and_evaluate(settings, params, run_id)


@task(name="gate against floors and champion", **_task)
def gate(settings: Settings, params: Params, candidate: Candidate) -> GateDecision:
    return promotion.gate(settings, params, candidate)


@task(name="register and promote (MLflow registry)", tags=[PROMOTION_TAG], retries=1, retry_delay_seconds=5, **_task)
def promote(settings: Settings, candidate: Candidate, decision: GateDecision) -> Outcome:
    outcome = promotion.promote(settings, candidate, decision)
    create_markdown_artifact(outcome.decision.to_markdown(), key="gate-decision", description="promotion gate")
    return outcome


@task(name="record the run in dvc.lock", retries=1, retry_delay_seconds=2, **_task)
def record_stages(settings: Settings, candidate: Candidate, decision: GateDecision) -> bool:
    return stages.record(settings, candidate, decision)


def started_by_deployment() -> bool:
    """Whether this flow run belongs to a deployment (started by its schedule, the UI, the API or another flow)."""
    from prefect.runtime import deployment

    return deployment.id is not None


@flow(name="retrain-digits", log_prints=True)
def retrain(
    overrides: dict[str, Any] | None = None, trigger: Trigger = "manual", allow_unsafe_overrides: bool = False
) -> dict[str, Any]:
    """Retrain on the current data version and promote the result if it passes the gate.

    ``overrides`` maps dotted params keys to values, e.g. ``{"train.epochs": 1}``; ``trigger`` says
    what started the run (the run's ``trigger`` tag). Overrides outside ``model.*`` and ``train.*``
    need ``allow_unsafe_overrides`` (``digits retrain --allow-unsafe-overrides``), and a deployment's
    runs never take them, whatever their parameters say. Overrides are tagged on the run and the version.
    """
    settings = get_settings()
    check_overrides(overrides, deployment=started_by_deployment(), allow_unsafe=allow_unsafe_overrides)
    params = load_params(settings.params_path, overrides)
    for line in recover(settings):  # runs left RUNNING by a killed process, a promotion stopped half-way
        print(line)
    data_version = version_data(settings, params)
    opened = open_run(settings, params, data_version, trigger, overrides)
    with tracking.run_context(settings, opened, stage="validation") as run:
        validate(settings, params, run.run_id)
        run.stage = "training"
        candidate = train(settings, params, run.run_id)
        run.stage = "gate"
        decision = gate(settings, params, candidate)
        run.stage = "promotion"
        outcome = promote(settings, candidate, decision)
    if not overrides:  # with overrides the run no longer matches params.yaml, which dvc.lock records
        record_stages(settings, candidate, outcome.decision)
    summary = summaries.summarize(data_version, run.run_id, outcome, candidate) | {"trigger": trigger}
    print(summaries.render(summary))
    return summary
