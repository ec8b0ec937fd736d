"""The prediction log's use cases: what people corrected, their review, their harvest into a data
version, and keeping the log to its retention."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from typing import Any

import numpy as np
from sqlalchemy.engine import Engine

from app import data as datasets
from pipeline import prediction_log, versioning
from pipeline.data import load_dataset, write_feedback
from pipeline.params import Params
from pipeline.settings import Settings
from pipeline.validation import DataValidationError, validate_dataset

log = logging.getLogger(__name__)


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


# ---------------------------------------------------------------- harvest


def part_of(image: bytes, test_share: float) -> str:
    """``"test"`` or ``"train"``, from the image's content alone: the same pixels always land in the same part."""
    return "test" if int.from_bytes(hashlib.sha256(image).digest()[:8], "big") / 2**64 < test_share else "train"


def harvest(settings: Settings, params: Params) -> dict[str, Any]:
    """Turn accepted corrections not harvested yet into a new data version under data/feedback/.

    Each image goes to feedback-train or feedback-test by its content hash. An image already in its
    part is not added twice; one that is an MNIST test image is rejected (it would leak the test
    set). The whole dataset is validated with Great Expectations before anything is written; the
    corrections are marked harvested with the new version after it is recorded. With nothing new,
    no version is made.
    """
    engine = open_log(settings)
    rows = prediction_log.ready_to_harvest(engine)
    report: dict[str, Any] = {"ready": len(rows), "data_version": None, "added": {"train": 0, "test": 0}}
    if not rows:
        return {**report, "message": "nothing new to harvest: no accepted correction since the last harvest"}
    datasets.prepare(settings, params)
    dataset = load_dataset(settings.data_dir)
    test_images = {image.tobytes() for image in dataset.x_test}
    known = {
        "train": {image.tobytes() for image in dataset.x_feedback_train},
        "test": {image.tobytes() for image in dataset.x_feedback_test},
    }
    new: dict[str, tuple[list[bytes], list[int]]] = {"train": ([], []), "test": ([], [])}
    leaked, repeated = [], 0
    for row in rows:
        if row["image"] in test_images:
            leaked.append(row["id"])
            continue
        part = part_of(row["image"], params.feedback.test_share)
        if row["image"] in known[part]:
            repeated += 1
            continue
        known[part].add(row["image"])
        new[part][0].append(row["image"])
        new[part][1].append(row["label"])
    report |= {"skipped_repeats": repeated, "rejected_mnist_test_images": len(leaked)}
    if leaked:
        prediction_log.mark_harvested(engine, leaked, None, reject_reason="the image is an MNIST test image")
    harvested = [row["id"] for row in rows if row["id"] not in set(leaked)]
    if not new["train"][0] and not new["test"][0]:
        prediction_log.mark_harvested(
            engine, harvested, versioning.pointer_md5(versioning.pointer_path(settings.home, settings.data_dir))
        )
        return {**report, "message": "nothing new to harvest: every accepted correction is in the data already"}

    def grown(x: np.ndarray, y: np.ndarray, part: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = new[part]
        added = np.frombuffer(b"".join(images), np.uint8).reshape(-1, 28, 28)
        return np.concatenate([x, added]), np.concatenate([y, np.asarray(labels, np.uint8)])

    x_train, y_train = grown(dataset.x_feedback_train, dataset.y_feedback_train, "train")
    x_test, y_test = grown(dataset.x_feedback_test, dataset.y_feedback_test, "test")
    checked = validate_dataset(
        replace(dataset, x_feedback_train=x_train, y_feedback_train=y_train, x_feedback_test=x_test, y_feedback_test=y_test),
        params.validation,
        settings.reports_dir / "validation",
    )
    if not checked.success:
        raise DataValidationError(checked)  # nothing was written, nothing marked: the next harvest tries again
    write_feedback(settings.data_dir, x_train, y_train, x_test, y_test)
    version = versioning.record(settings.home, settings.data_dir)
    prediction_log.mark_harvested(engine, harvested, version.md5)
    log.info("harvested %d corrections into data version %s", len(harvested), version.short)
    return {
        **report,
        "data_version": version.md5,
        "added": {part: len(new[part][0]) for part in new},
        "feedback_train": len(x_train),
        "feedback_test": len(x_test),
        "message": f"new data version {version.md5}: commit data.dvc, then `digits retrain` trains on it",
    }


def render_harvest(report: dict[str, Any]) -> str:
    if report["data_version"] is None:
        return report["message"]
    return "\n".join(
        [
            f"data version     {report['data_version']}",
            f"added            {report['added']['train']} to feedback-train, {report['added']['test']} to feedback-test",
            f"feedback now     {report['feedback_train']} train, {report['feedback_test']} test images",
            f"skipped          {report['skipped_repeats']} already in the data, "
            f"{report['rejected_mnist_test_images']} MNIST test images (rejected)",
            "commit data.dvc (git add data.dvc && git commit), then `digits retrain` trains on it",
        ]
    )
