"""Sweep use cases: size the cluster, open the sweep's runs, and record which grid point won and why.

Each grid point trains in its own MLflow run nested under the sweep's run. The choice is made on
the validation hold-out only (``app.training.best``); only the chosen model meets the test set.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from app.promotion import Outcome
from app.training import TrainedModel
from pipeline import registry, tracking
from pipeline.params import GridPoint, Params
from pipeline.settings import Settings
from pipeline.versioning import DataVersion


@dataclass(frozen=True)
class Cluster:
    """Where the grid points train: a scheduler address, or the size of a local cluster."""

    address: str | None
    workers: int | None  # local cluster only
    tf_threads: int | None  # TensorFlow threads per training; None: TensorFlow's own default

    def describe(self) -> str:
        threads = (
            f"{self.tf_threads} TensorFlow thread{'s' if self.tf_threads != 1 else ''}"
            if self.tf_threads
            else "TensorFlow's default threads"
        )
        if self.address:
            return f"the Dask scheduler at {self.address} ({threads} per training)"
        return f"a local Dask cluster of {self.workers} worker{'s' if self.workers != 1 else ''} x {threads}"


def plan_cluster(settings: Settings, points: int, address: str | None = None, cores: int | None = None) -> Cluster:
    """One worker per core (no more than grid points), the cores shared out as TensorFlow threads.

    Each worker runs one training at a time; TensorFlow's pools are limited so that the workers do
    not fight over the cores. A scheduler address leaves sizing to its workers.
    """
    address = address or settings.dask_address
    if address:
        return Cluster(address, None, settings.sweep_tf_threads)
    cores = cores or usable_cores()
    workers = settings.dask_workers or max(1, min(points, cores))
    return Cluster(None, workers, settings.sweep_tf_threads or max(1, cores // workers))


def usable_cores() -> int:
    """Cores this process may run on (a container's or taskset's limit, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def open_sweep_run(settings: Settings, params: Params, data_version: DataVersion, points: list[GridPoint]) -> str:
    run_id = tracking.start_run(settings, params, data_version, run_name=f"sweep-{data_version.short}", tags={"kind": "sweep"})
    client = registry.connect(settings)
    client.log_param(run_id, "sweep.grid", json.dumps(params.sweep.grid)[:6000])
    client.log_param(run_id, "sweep.candidates", len(points))
    client.log_dict(run_id, {p.name: p.values for p in points}, "sweep/grid.json")
    return run_id


def open_point_run(settings: Settings, point: GridPoint, data_version: DataVersion, sweep_run_id: str) -> str:
    tags = {"kind": "sweep-candidate", "sweep_candidate": point.name, "sweep_values": point.label[:5000]}
    run_name = f"sweep-{data_version.short}-{point.name}"
    return tracking.start_run(settings, point.params, data_version, run_name, parent_run_id=sweep_run_id, tags=tags)


def rows(
    points: list[GridPoint],
    run_ids: list[str],
    trained: dict[str, TrainedModel],
    failures: dict[str, str],
    chosen: str,
) -> list[dict[str, Any]]:
    """One row per grid point: its values, run, validation scores, whether it was chosen, or why it failed."""
    table = []
    for point, run_id in zip(points, run_ids, strict=True):
        model = trained.get(point.name)
        table.append(
            {
                "name": point.name,
                "values": point.values,
                "run_id": run_id,
                "val_accuracy": round(model.val_accuracy, 5) if model else None,
                "val_loss": round(model.val_loss, 5) if model else None,
                "selected": point.name == chosen,
                "error": failures.get(point.name),
            }
        )
    return table


def record(settings: Settings, sweep_run_id: str, table: list[dict[str, Any]], outcome: Outcome, chosen: TrainedModel) -> None:
    """The sweep's run gets the table of grid points and the outcome; each point's run says whether it was chosen."""
    client = registry.connect(settings)
    for row in table:
        client.set_tag(row["run_id"], "sweep_selected", str(row["selected"]).lower())
    client.set_tag(sweep_run_id, "best_run_id", chosen.run_id)
    client.set_tag(sweep_run_id, "gate", "promote" if outcome.decision.promote else "reject")
    if outcome.decision.promote and outcome.registered:
        client.set_tag(sweep_run_id, "promoted_version", outcome.registered.version)
    client.log_metric(sweep_run_id, "best_val_accuracy", chosen.val_accuracy)
    client.log_table(
        sweep_run_id,
        {
            "candidate": [r["name"] for r in table],
            "values": [json.dumps(r["values"]) for r in table],
            "val_accuracy": [r["val_accuracy"] for r in table],
            "val_loss": [r["val_loss"] for r in table],
            "selected": [r["selected"] for r in table],
            "run_id": [r["run_id"] for r in table],
        },
        "sweep/candidates.json",
    )
