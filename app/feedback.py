"""The prediction log's use cases: what people corrected, and keeping the log to its retention."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Engine

from pipeline import prediction_log
from pipeline.settings import Settings


def open_log(settings: Settings) -> Engine:
    """The prediction log of this project (``DIGITS_LOG_DB_URL`` or ``logs/predictions.db``), migrated."""
    return prediction_log.open_log(settings.prediction_log_url)


def summary(settings: Settings) -> dict[str, Any]:
    """Corrections received: by label, by model version with its accuracy on them, and how many are ready to harvest."""
    database = prediction_log.safe_url(settings.prediction_log_url)
    return {"database": database, **prediction_log.feedback_summary(open_log(settings))}


def render(report: dict[str, Any]) -> str:
    lines = [
        f"prediction log   {report['database']}",
        f"answers logged   {report['answers']:,}",
        f"corrections      {report['feedback']:,} ({report['ready_to_harvest']:,} ready to harvest)",
    ]
    if report["feedback"]:
        lines.append("by true digit    " + "  ".join(f"{d}: {n}" for d, n in report["by_label"].items()))
        lines.append("by model version (accuracy on the answers people corrected or confirmed):")
        lines += [
            f"  v{version:<6} {row['correct']:>6,} of {row['feedback']:<6,} right  {row['accuracy']:.1%}"
            for version, row in report["by_version"].items()
        ]
    else:
        lines.append("no corrections yet: the drawing page's Right / Wrong buttons and POST /feedback send them")
    return "\n".join(lines)


def prune(settings: Settings, days: float | None = None) -> tuple[int, float]:
    """Delete uncorrected answers older than ``days`` (default: the retention setting): (deleted, days)."""
    days = settings.log_retention_days if days is None else days
    return prediction_log.prune(open_log(settings), days), days
