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
        f"corrections      {report['feedback']:,} ({report['ready_to_harvest']:,} ready to harvest, "
        f"{report['quarantined']:,} held for `digits feedback review`, {report['rejected']:,} rejected)",
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


def held(settings: Settings, limit: int = 20) -> list[dict[str, Any]]:
    """Corrections waiting for review, oldest first."""
    return prediction_log.quarantined(open_log(settings), limit)


def review(settings: Settings, ids: list[int] | None, approve: bool) -> int:
    """Accept or reject held corrections by id (all of them with ``ids`` None); how many changed."""
    return prediction_log.review(open_log(settings), ids, approve)


def render_held(rows: list[dict[str, Any]]) -> str:
    """Each held correction beside a small drawing of its digit, so a person can judge it."""
    if not rows:
        return "no corrections wait for review"
    blocks = []
    for row in rows:
        lines = [
            f"#{row['id']}  labelled {row['label']}; v{row['model_version']} answered {row['digit']} ({row['confidence']:.1%})",
            f"     held: {row['reason']}",
            *("     " + line for line in sketch(prediction_log.image_of(row["image"]))),
        ]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n\naccept with --approve ID, reject with --reject ID (or --approve-all / --reject-all)"


def sketch(image: Any) -> list[str]:
    """A 28x28 digit as 14 lines of text (each character a 2x2 block)."""
    blocks = image.reshape(14, 2, 14, 2).mean(axis=(1, 3))
    shades = " .:*#"
    return ["".join(shades[min(int(v) * len(shades) // 256, len(shades) - 1)] for v in row).rstrip() for row in blocks]
