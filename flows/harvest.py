"""The harvest flow: accepted corrections from the prediction log become a new DVC data version."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from app import feedback
from pipeline.params import Params, load_params
from pipeline.settings import Settings, get_settings


@task(name="harvest corrections (prediction log -> DVC)", cache_policy=NO_CACHE)
def harvest_corrections(settings: Settings, params: Params) -> dict[str, Any]:
    return feedback.harvest(settings, params)


@flow(name="harvest-feedback", log_prints=True)
def harvest() -> dict[str, Any]:
    """Harvest accepted corrections into data/feedback/ as a new data version (none when nothing is new)."""
    settings = get_settings()
    report = harvest_corrections(settings, load_params(settings.params_path))
    create_markdown_artifact(
        "```\n" + feedback.render_harvest(report) + "\n```", key="harvest", description="corrections harvested"
    )
    print(feedback.render_harvest(report))
    return report
