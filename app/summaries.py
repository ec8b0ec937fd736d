"""What a retrain or a sweep reports: one dict (the ``--json`` output and the flow's result) and its text."""

from __future__ import annotations

from typing import Any

from app.promotion import Outcome
from app.training import Candidate
from pipeline.params import grid_label
from pipeline.versioning import DataVersion


def summarize(data_version: DataVersion, run_id: str, outcome: Outcome, candidate: Candidate) -> dict[str, Any]:
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


def render(summary: dict[str, Any]) -> str:
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


def render_sweep(summary: dict[str, Any]) -> str:
    lines = [
        f"sweep run      {summary['sweep_run_id']}",
        "candidates     (chosen on validation accuracy; the test set took no part)",
    ]
    for r in summary["candidates"]:
        mark = "*" if r["selected"] else " "
        score = (
            f"val accuracy {r['val_accuracy']:.4f}  val loss {r['val_loss']:.4f}" if r["val_accuracy"] is not None else "FAILED"
        )
        lines.append(f"             {mark} {r['name']:<4} {score}  {grid_label(r['values'])}")
        if r["error"]:
            lines.append(f"                    {r['error'][:200]}")
    return "\n".join(lines) + "\n" + render(summary)


def sweep_markdown(table: list[dict[str, Any]]) -> str:
    """The grid points as a markdown table, for the Prefect artifact."""
    lines = ["| candidate | values | val accuracy | val loss | run |", "|---|---|---|---|---|"]
    for r in table:
        name = f"**{r['name']}** (chosen)" if r["selected"] else r["name"]
        score = f"{r['val_accuracy']:.4f} | {r['val_loss']:.4f}" if r["val_accuracy"] is not None else f"failed: {r['error']} |"
        lines.append(f"| {name} | {grid_label(r['values'])} | {score} | {r['run_id']} |")
    return "\n".join(lines)
