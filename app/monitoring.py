"""Watching production: a window of the prediction log against the champion's reference.

``digits monitor`` and the Prefect flow ``monitor-digits`` call :func:`monitor`: it reads the window,
builds the reference, runs the checks (pipeline/monitoring.py), writes the report under
reports/monitoring/ and records it all as one run of the MLflow experiment ``digits-monitoring``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from app import data as datasets
from app.feedback import open_log
from pipeline import monitoring, prediction_log, registry, tracking
from pipeline.params import Params
from pipeline.settings import Settings

if TYPE_CHECKING:
    from pathlib import Path

    import pandas as pd
    from mlflow import MlflowClient

    from pipeline.data import Dataset

log = logging.getLogger(__name__)

HOLD_OUT = "validation hold-out images"
TEST_IMAGES = "MNIST test images"


@dataclass(frozen=True)
class Reference:
    """The champion's answers on images it never learnt from, as the service would log them."""

    frame: pd.DataFrame
    version: str
    source: str  # HOLD_OUT, or TEST_IMAGES when the hold-out cannot be rebuilt
    why: str
    accuracy: float
    runtime: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "images": len(self.frame),
            "source": self.source,
            "why": self.why,
            "accuracy": self.accuracy,
            "runtime": self.runtime,
        }


def champion_reference(settings: Settings, params: Params, client: MlflowClient) -> Reference:
    """The champion, as served, on a seeded sample of its validation hold-out (``monitor.reference_images``).

    The hold-out is rebuilt as training drew it (pipeline.train.split_for_validation with the champion's own seed and
    share) from the current data version's training images: images it validated on but never learnt from, so its
    answers there are what MNIST-like digits get, and their statistics are the training data's. When images were added
    since it trained, or it trained without a hold-out, that draw would mix in images it learnt from: then a seeded
    sample of MNIST's test images stands in (no version ever trains on them).
    """
    from pipeline.data import has_dataset, load_dataset
    from pipeline.served import load

    champion = registry.get_alias(client, settings.model_name)
    if champion is None:
        raise registry.PromotionError("there is no champion to compare the prediction log with: run `digits retrain` first")
    if not has_dataset(settings.data_dir):
        datasets.prepare(settings, params)
    dataset = load_dataset(settings.data_dir)
    images, labels, source, why = _unseen_images(settings, params, client, champion, dataset)
    sample = params.monitor.reference_images
    if len(images) > sample:
        keep = np.sort(np.random.default_rng(params.monitor.seed).choice(len(images), sample, replace=False))
        images, labels = images[keep], labels[keep]
    model = load(champion, settings.serve_runtime, settings.serve_tf_threads, settings.unsure_threshold)
    frame = monitoring.answers_frame(model.probabilities(images), model.unsure_threshold, images)
    accuracy = float(np.mean(frame["digit"].to_numpy() == labels))
    log.info("reference: v%s (%s) on %d %s, accuracy %.4f", champion.version, model.runtime, len(frame), source, accuracy)
    return Reference(frame, champion.version, source, why, accuracy, model.runtime)


def _unseen_images(
    settings: Settings, params: Params, client: MlflowClient, champion: registry.ModelRef, dataset: Dataset
) -> tuple[np.ndarray, np.ndarray, str, str]:
    """The champion's validation hold-out when it can be drawn again, else MNIST's test images: (images, labels, source, why)."""
    from pipeline.train import split_for_validation

    run = client.get_run(champion.run_id).data if champion.run_id else None
    if run is None:
        return dataset.x_test, dataset.y_test, TEST_IMAGES, "the champion has no training run to read its hold-out from"
    seed = int(run.params.get("train.seed", params.train.seed))
    share = float(run.params.get("train.validation_split", params.train.validation_split))
    # the draw is a permutation of the training images, so it holds while they are the champion's: images are only
    # ever appended (`digits data add`), so the same count means the same images; harvested corrections live apart
    trained_rows = run.metrics.get("validation_rows_train")
    current = datasets.current_version(settings).md5
    same_images = (
        int(trained_rows) == len(dataset.x_train) if trained_rows is not None else champion.data_version in (None, current)
    )
    if not same_images:
        why = f"training images were added since the champion trained (data version {current[:8]})"
        return dataset.x_test, dataset.y_test, TEST_IMAGES, why
    *_, images, labels = split_for_validation(dataset.x_train, dataset.y_train, share, seed)
    if not len(images):
        return dataset.x_test, dataset.y_test, TEST_IMAGES, "the champion trained without a hold-out"
    return images, labels, HOLD_OUT, f"drawn as training drew it: train.seed {seed}, train.validation_split {share}"


def monitor(settings: Settings, params: Params, window: str = "24h", now: datetime | None = None) -> dict[str, Any]:
    """Compare the answers of the last ``window`` (30m, 24h, 7d) with the champion's reference; the report as a dict.

    ``drift`` is true when a check found drift, never over fewer than ``monitor.min_predictions`` answers. The HTML
    report (a summary page, its figures and Evidently's report) goes under reports/monitoring/, and the whole
    of it into one run of the MLflow experiment ``digits-monitoring`` (its figures as metrics).
    """
    mp = params.monitor
    until = now or prediction_log.utc_now()
    since = until - monitoring.parse_window(window)
    client = registry.connect(settings.model_copy(update={"experiment": settings.monitoring_experiment}))
    experiment = client.get_experiment_by_name(settings.monitoring_experiment)
    # the process is named so that a monitor killed outright is marked FAILED by the next retrain
    run_id = client.create_run(experiment.experiment_id, run_name=f"monitor-{window}", tags=tracking.process_tags()).info.run_id
    folder = settings.reports_dir / "monitoring" / f"{until:%Y%m%d-%H%M%S}-{run_id[:8]}"
    with tracking.run_context(settings, run_id, stage="reading the prediction log") as run:
        engine = open_log(settings)
        current = monitoring.read_window(engine, since, until)
        by_version = current["model_version"].value_counts().to_dict()
        feedback = monitoring.feedback_check(prediction_log.accuracy_by_version(engine, since, until, accepted_only=True), mp)
        report: dict[str, Any] = {
            "drift": False,
            "verdict": "",
            "window": window,
            "since": since.isoformat(timespec="seconds"),
            "until": until.isoformat(timespec="seconds"),
            "predictions": len(current),
            "by_version": {str(v): int(by_version[v]) for v in sorted(by_version, key=prediction_log.version_order)},
            "feedback_ready": prediction_log.ready_count(engine),
            "min_feedback_to_retrain": mp.min_feedback_to_retrain,
            "reference": None,
        }
        folder.mkdir(parents=True, exist_ok=True)
        images, evidently_html = [], None
        if len(current) >= mp.min_predictions:
            run.stage = "reference"
            reference = champion_reference(settings, params, client)
            run.stage = "comparison"
            evidently_html = "evidently.html"
            drift = monitoring.column_drift(reference.frame, current, mp, folder / evidently_html)
            checks = monitoring.output_and_input_checks(reference.frame, current, drift, mp)
            report["reference"] = reference.to_dict()
            images = _write_figures(folder, reference, current, checks)
        else:
            # too few answers to compare distributions: every check waits, the feedback figures are still shown
            reason = f"too few predictions ({len(current)} of {mp.min_predictions})"
            checks = {name: {"drift": None, "reason": reason} for name in monitoring.CHECKS[:-1]}
            feedback["drift"] = None
        report["checks"] = {**checks, "feedback_accuracy": feedback}
        report["drift"], report["verdict"] = monitoring.verdict(report["checks"], len(current), mp.min_predictions)
        run.stage = "report"
        monitoring.write_summary(folder / "report.html", report, images, evidently_html)
        report["report"] = str(folder / "report.html")
        report["mlflow_run_id"] = run_id
        _log_run(client, run_id, report, params, folder)
    return report


def _write_figures(folder: Path, reference: Reference, current: pd.DataFrame, checks: dict[str, dict[str, Any]]) -> list[str]:
    from pipeline import plots

    drifted = {name: column["drift"] for name, column in checks["input_statistics"]["columns"].items()}
    title = f"champion v{reference.version} on {len(reference.frame):,} {reference.source} (reference) and the window"
    written = []
    for name, figure in (
        ("outputs.png", plots.monitoring_outputs(reference.frame, current, title)),
        ("inputs.png", plots.monitoring_inputs(reference.frame, current, drifted)),
    ):
        figure.savefig(folder / name)
        written.append(name)
    return written


def _log_run(client: MlflowClient, run_id: str, report: dict[str, Any], params: Params, folder: Path) -> None:
    """The report into its MLflow run: its numbers as metrics, the thresholds as params, the files as artifacts."""
    from mlflow.entities import Param, RunTag

    values = {"window": report["window"], **{f"monitor.{k}": v for k, v in params.monitor.model_dump().items()}}
    reference = report["reference"] or {}
    tags = {
        "verdict": report["verdict"][:250],
        "window_since": report["since"],
        "window_until": report["until"],
        **({"champion_version": reference["version"], "reference_source": reference["source"]} if reference else {}),
    }
    client.log_batch(
        run_id,
        params=[Param(k, str(v)) for k, v in values.items()],
        tags=[RunTag(k, str(v)) for k, v in tags.items()],
    )
    tracking.log_metrics(run_id, monitoring.figures(report))
    if reference:
        tracking.log_metrics(run_id, {"reference_accuracy": reference["accuracy"], "reference_images": reference["images"]})
    client.log_dict(run_id, report, "monitoring/report.json")
    client.log_artifacts(run_id, str(folder), "monitoring")


# ---------------------------------------------------------------- what people read


def render(report: dict[str, Any]) -> str:
    """The report as a table for the terminal."""
    reference = report["reference"]
    lines = [
        f"verdict          {report['verdict']}",
        f"window           {report['window']} ({report['since']} to {report['until']} UTC)",
        f"predictions      {report['predictions']:,}" + monitoring.versions_text(report["by_version"]),
        "reference        "
        + (
            f"champion v{reference['version']} ({reference['runtime']}) on {reference['images']:,} {reference['source']}, "
            f"accuracy {reference['accuracy']:.2%}"
            if reference
            else "not built (no comparison)"
        ),
        "",
        f"{'check':<18} {'state':<11} figures",
    ]
    for name, check in report["checks"].items():
        lines.append(f"{name:<18} {monitoring.state_of(check.get('drift')):<11} {monitoring.describe_check(name, check)}")
    lines += [
        "",
        f"corrections      {report['feedback_ready']:,} accepted, not harvested yet (a retrain is worth it from "
        f"{report['min_feedback_to_retrain']:,}: monitor.min_feedback_to_retrain)",
        f"report           {report['report']}",
        f"MLflow run       {report['mlflow_run_id']} (experiment digits-monitoring)",
    ]
    return "\n".join(lines)


def to_markdown(report: dict[str, Any]) -> str:
    """The summary for the Prefect UI (a markdown artifact)."""
    reference = report["reference"]
    rows = "\n".join(
        f"| {name} | {monitoring.state_of(check.get('drift'))} | {monitoring.describe_check(name, check)} |"
        for name, check in report["checks"].items()
    )
    facts = [
        f"**{'Drift' if report['drift'] else 'No drift'}**: {report['verdict']}",
        "",
        f"- window: {report['window']} ({report['since']} to {report['until']} UTC)",
        f"- predictions: {report['predictions']:,}" + monitoring.versions_text(report["by_version"]),
        "- reference: "
        + (
            f"champion v{reference['version']} on {reference['images']:,} {reference['source']}, "
            f"accuracy {reference['accuracy']:.2%}"
            if reference
            else "not built"
        ),
        f"- corrections ready to harvest: {report['feedback_ready']:,} (retrain from {report['min_feedback_to_retrain']:,})",
        f"- report: `{report['report']}`; MLflow run `{report['mlflow_run_id']}`",
    ]
    return "\n".join([*facts, "", "| check | state | figures |", "|---|---|---|", rows])
