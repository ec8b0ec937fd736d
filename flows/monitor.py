"""The monitoring flow: a window of the prediction log against the champion's reference, with a report."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from app import monitoring
from pipeline.params import Params, load_params
from pipeline.settings import Settings, get_settings


@task(name="compare the window with the reference (Evidently)", cache_policy=NO_CACHE)
def compare_window(settings: Settings, params: Params, window: str) -> dict[str, Any]:
    return monitoring.monitor(settings, params, window)


@flow(name="monitor-digits", log_prints=True)
def monitor(window: str = "24h") -> dict[str, Any]:
    """Check the answers of the last ``window`` (30m, 24h, 7d) for drift against the champion's reference."""
    settings = get_settings()
    report = compare_window(settings, load_params(settings.params_path), window)
    create_markdown_artifact(monitoring.to_markdown(report), key="monitoring", description="drift of the prediction log")
    print(f"{report['verdict']} ({report['predictions']} answers in {window}); report {report['report']}")
    return report
