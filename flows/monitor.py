"""The monitoring flow: a window of the prediction log against the champion's reference, with a report."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from app import monitoring
from flows.harvest import harvest
from flows.retrain import retrain
from pipeline.monitoring import retrain_reason
from pipeline.params import Params, load_params
from pipeline.settings import Settings, get_settings


@task(name="compare the window with the reference (Evidently)", cache_policy=NO_CACHE)
def compare_window(settings: Settings, params: Params, window: str) -> dict[str, Any]:
    return monitoring.monitor(settings, params, window)


@task(name="start the retraining deployment", cache_policy=NO_CACHE)
def start_retraining_deployment(settings: Settings, reason: str) -> dict[str, Any]:
    from flows import deployment

    run = deployment.trigger(settings, reason=reason)
    return {"trigger": reason, "flow_run_id": str(run.id), "deployment": deployment.full_name(settings.deployment)}


@flow(name="monitor-digits", log_prints=True)
def monitor(window: str = "24h", retrain_when_needed: bool = False, via_deployment: bool = False) -> dict[str, Any]:
    """Check the answers of the last ``window`` (30m, 24h, 7d) for drift against the champion's reference.

    With ``retrain_when_needed``, drift or enough accepted corrections (``monitor.min_feedback_to_retrain``)
    start a retrain, the corrections harvested first: here, as a subflow, or ``via_deployment`` as a
    run of the retraining deployment (what the monitor's own deployment does).
    """
    settings = get_settings()
    params = load_params(settings.params_path)
    report = compare_window(settings, params, window)
    create_markdown_artifact(monitoring.to_markdown(report), key="monitoring", description="drift of the prediction log")
    print(f"{report['verdict']} ({report['predictions']} answers in {window}); report {report['report']}")
    if retrain_when_needed:
        reason = retrain_reason(report["drift"], report["feedback_ready"], params.monitor.min_feedback_to_retrain)
        report["retrain"] = None
        if reason is None:
            print(
                f"no retrain: no drift, {report['feedback_ready']} of {params.monitor.min_feedback_to_retrain} corrections ready"
            )
        else:
            report["harvest"] = harvest() if report["feedback_ready"] else None
            report["retrain"] = start_retraining_deployment(settings, reason) if via_deployment else retrain(trigger=reason)
    return report
