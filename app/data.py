"""Data use cases: version the dataset, validate it, add labelled images as a new version."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline import registry, tracking, versioning
from pipeline.data import add_images, has_dataset, ingest, load_dataset
from pipeline.params import Params
from pipeline.settings import Settings
from pipeline.validation import DataValidationError, ValidationReport, validate_dataset
from pipeline.versioning import DataVersion

log = logging.getLogger(__name__)


def prepare(settings: Settings, params: Params) -> DataVersion:
    """Make sure data/ holds a dataset (pull the committed version, else ingest) and record its version."""
    root, data_dir = settings.home, settings.data_dir
    if not has_dataset(data_dir) and not versioning.pull(root, data_dir):
        ingest(params.data, data_dir, settings.cache_dir)
    version = versioning.record(root, data_dir)
    log.info("data version %s (%d files, %.1f MB)", version.short, version.files, version.size / 1e6)
    return version


def current_version(settings: Settings) -> DataVersion:
    """The version data.dvc names, or data/ recorded now (not pushed) when there is no pointer yet."""
    pointer = versioning.read_pointer(versioning.pointer_path(settings.home, settings.data_dir))
    if pointer:
        return DataVersion(pointer["md5"], int(pointer.get("nfiles", 0)), int(pointer.get("size", 0)), False)
    return versioning.record(settings.home, settings.data_dir, push=False)


def validate(settings: Settings, params: Params, run_id: str | None = None) -> ValidationReport:
    """Great Expectations on the dataset; raises DataValidationError naming every failed expectation.

    With a ``run_id`` the HTML report and the statistics are logged into that MLflow run.
    """
    import mlflow

    report_dir = settings.reports_dir / "validation"
    report = validate_dataset(load_dataset(settings.data_dir), params.validation, report_dir)
    if run_id is not None:
        registry.connect(settings)
        with tracking.active(run_id):
            mlflow.log_artifacts(str(report.report_html.parent), "validation_report")
            mlflow.log_metrics({f"validation_{k}": float(v) for k, v in report.statistics.items()})
            mlflow.log_text(report.summary(), "validation_summary.md")
            mlflow.set_tag("validation", "passed" if report.success else "failed")
    if not report.success:
        raise DataValidationError(report)
    return report


def add(settings: Settings, params: Params, folder: Path) -> tuple[int, DataVersion]:
    """Add a folder of labelled images (one sub-folder per digit) as a new data version: (images added, version)."""
    prepare(settings, params)
    total = add_images(folder, settings.data_dir)
    return total, versioning.record(settings.home, settings.data_dir)
