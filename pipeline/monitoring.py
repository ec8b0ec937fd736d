"""Watching production: a window of the prediction log against a reference, column by column, with Evidently.

The reference is what the champion was made with: its answers on images of its validation hold-out
(training images it never learnt from, so its confidence there is what new digits like MNIST's
get) and those images' input statistics. The window is what the service answered since. Each
check says drift (True), no drift (False) or cannot tell (None); the verdict claims drift only over
enough answers.
"""

from __future__ import annotations

import html
import re
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.image_stats import STATISTICS, image_statistics
from pipeline.params import MonitorParams

if TYPE_CHECKING:
    from datetime import datetime

    import pandas as pd
    from sqlalchemy.engine import Engine

# what the model said, compared by Evidently; the share of unsure answers has a rule of its own
OUTPUTS = ("digit", "confidence")
CHECKS = ("predicted_class", "confidence", "unsure_share", "input_statistics", "feedback_accuracy")
# the project's own two-sample test for the predicted digit (see _register_chi2_contingency)
CHI2_CONTINGENCY = "chi2_contingency"

_CSS = {True: "drift", False: "ok", None: "unjudged"}  # a check's state as a class of the summary page
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_WINDOW = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([mhdw])\s*$")


class WindowError(ValueError):
    """A window that is not a positive number of minutes, hours, days or weeks."""


def parse_window(text: str) -> timedelta:
    """``30m``, ``24h``, ``7d``, ``2w`` (a decimal number is fine: ``1.5h``) as a timedelta; WindowError otherwise."""
    match = _WINDOW.match(text.lower()) if isinstance(text, str) else None
    if match is None:
        raise WindowError(f"a window is a number and a unit (m, h, d or w), e.g. 30m, 24h or 7d; got {text!r}")
    span = timedelta(**{_UNITS[match[2]]: float(match[1])})
    if span <= timedelta(0):
        raise WindowError(f"a window must be longer than nothing; got {text!r}")
    return span


# ---------------------------------------------------------------- the two sides


def read_window(engine: Engine, since: datetime, until: datetime) -> pd.DataFrame:
    """The answers given from ``since`` up to ``until`` (UTC): the answering version, the answers, and the input
    statistics of the images they answered."""
    import pandas as pd
    import sqlalchemy as sa

    from pipeline.prediction_log import predictions

    answered = ("digit", "confidence", "unsure")
    query = (
        sa.select(predictions.c.model_version, *(predictions.c[name] for name in answered), predictions.c.image)
        .where(predictions.c.created_at >= since, predictions.c.created_at < until)
        .order_by(predictions.c.id)
    )
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    images = np.frombuffer(b"".join(row.image for row in rows), dtype=np.uint8).reshape(-1, 28, 28)
    frame = pd.DataFrame([row[:-1] for row in rows], columns=["model_version", *answered])
    return _typed(frame.assign(**image_statistics(images)))


def answers_frame(probabilities: np.ndarray, unsure_threshold: float, images: np.ndarray) -> pd.DataFrame:
    """What the service would log for these images: digit, confidence, unsure and input statistics, a row each.

    Confidence is rounded as the service rounds it; unsure is decided before rounding, as there.
    """
    import pandas as pd

    probabilities = np.asarray(probabilities, dtype=np.float64)
    digits = probabilities.argmax(axis=1)
    confidence = probabilities[np.arange(len(digits)), digits]
    frame = pd.DataFrame(
        {"digit": digits, "confidence": np.round(confidence, 6), "unsure": confidence < unsure_threshold}
        | image_statistics(images)
    )
    return _typed(frame)


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """One dtype per column whichever side it comes from (the log's rows, or arrays): Evidently types columns by them."""
    types = {"digit": "int64", "confidence": "float64", "unsure": "bool"} | dict.fromkeys(STATISTICS, "float64")
    return frame.astype(types)


# ---------------------------------------------------------------- Evidently


def _evidently() -> None:
    """Import Evidently, ready for the monitor's report.

    Evidently 0.7 imports ``infer_dtype_from_object`` from pandas, which pandas 3 (in the lock) removed; only its
    legacy column-type test calls it, which the monitor never runs, so a stand-in lets the import succeed.
    """
    import pandas.core.dtypes.common as pandas_common

    if not hasattr(pandas_common, "infer_dtype_from_object"):
        pandas_common.infer_dtype_from_object = lambda dtype: pandas_common.pandas_dtype(dtype).type
    import evidently  # noqa: F401

    _register_chi2_contingency()


def _register_chi2_contingency() -> None:
    """A two-sample chi-square test (of homogeneity) for categorical columns, under the name ``chi2_contingency``.

    Evidently's own ``chisquare`` takes the reference's shares as exact, which holds only when the reference is far
    larger than the window: with a window as large as the reference it flags drift in most windows of the very same
    distribution. The contingency table counts both samples' noise, so its p-value means what it says at any size.
    """
    from evidently.legacy.calculations.stattests import registry
    from evidently.legacy.core import ColumnType

    try:
        registry.get_registered_stattest(CHI2_CONTINGENCY, ColumnType.Categorical)
        return  # registered once a process
    except registry.StatTestNotFoundError:
        pass

    def chi2_contingency(reference: pd.Series, current: pd.Series, _type: ColumnType, threshold: float) -> tuple[float, bool]:
        import pandas as pd
        from scipy.stats import chi2_contingency as test

        # a row per sample, a column per value either sample has
        table = pd.concat([reference.value_counts(), current.value_counts()], axis=1).fillna(0).to_numpy().T
        if table.shape[1] < 2:  # one value on both sides: nothing can have moved
            return 1.0, False
        p_value = float(test(table, correction=False).pvalue)
        return p_value, p_value < threshold

    stattest = registry.StatTest(
        name=CHI2_CONTINGENCY,
        display_name="chi-square test of homogeneity p_value",
        allowed_feature_types=[ColumnType.Categorical],
        default_threshold=0.05,
    )
    registry.register_stattest(stattest, default_impl=chi2_contingency)


def column_drift(
    reference: pd.DataFrame, current: pd.DataFrame, params: MonitorParams, html_path: Path | None = None
) -> dict[str, dict[str, Any]]:
    """Evidently's drift test on the predicted digit, the confidence and each input statistic: per column its
    ``method``, ``threshold``, ``score`` (a p-value or a distance, as the method has it) and ``drift``.

    With ``html_path``, Evidently's report goes there: one section for what the model said, one for what it was shown.
    """
    _evidently()
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    tests = {
        "num_method": params.num_stattest,
        "num_threshold": params.num_threshold,
        "cat_method": params.cat_stattest,
        "cat_threshold": params.cat_threshold,
    }
    report = Report(
        [
            DataDriftPreset(columns=list(OUTPUTS), **tests),
            DataDriftPreset(columns=list(STATISTICS), drift_share=params.drift_share, **tests),
        ],
        include_tests=True,  # each column's verdict comes as a test
    )
    definition = DataDefinition(numerical_columns=["confidence", *STATISTICS], categorical_columns=["digit"])
    columns = [*OUTPUTS, *STATISTICS]
    # Evidently's plots correlate columns, and one that does not vary (every box at the edge) divides by zero: harmless
    with np.errstate(invalid="ignore", divide="ignore"):
        snapshot = report.run(
            Dataset.from_pandas(current[columns], data_definition=definition),
            Dataset.from_pandas(reference[columns], data_definition=definition),
        )
    if html_path is not None:
        snapshot.save_html(str(html_path))
    return _column_results(snapshot.dict())


def _column_results(snapshot: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per column, from Evidently's exported results: its ValueDrift metric (the score) and that metric's test."""
    results: dict[str, dict[str, Any]] = {}
    for metric in snapshot["metrics"]:
        config = metric["config"]
        if config["type"].endswith(":ValueDrift"):
            results[config["column"]] = {
                "method": config.get("method"),
                "threshold": config.get("threshold"),
                "score": float(metric["value"]),
                "drift": None,
            }
    for test in snapshot["tests"]:
        column = test["metric_config"]["params"].get("column")
        if column in results and test["metric_config"]["params"]["type"].endswith(":ValueDrift"):
            results[column]["drift"] = test["status"] == "FAIL"
    missing = {column for column in OUTPUTS + STATISTICS if results.get(column, {}).get("drift") is None}
    if missing:  # a changed Evidently export must not read as "no drift"
        raise RuntimeError(f"Evidently's report has no drift result for {sorted(missing)}")
    return results


# ---------------------------------------------------------------- checks and verdict


def output_and_input_checks(
    reference: pd.DataFrame, current: pd.DataFrame, drift: dict[str, dict[str, Any]], params: MonitorParams
) -> dict[str, dict[str, Any]]:
    """The checks on what the model said and what it was shown, from the per-column drift results."""

    def shares(frame: pd.DataFrame) -> dict[str, float]:
        counts = np.bincount(frame["digit"].to_numpy(), minlength=10)[:10]
        return {str(d): float(counts[d] / max(len(frame), 1)) for d in range(10)}

    window_unsure, reference_unsure = float(current["unsure"].mean()), float(reference["unsure"].mean())
    drifted = [name for name in STATISTICS if drift[name]["drift"]]
    statistic_method = drift[STATISTICS[0]]
    return {
        "predicted_class": {**drift["digit"], "window": shares(current), "reference": shares(reference)},
        "confidence": {
            **drift["confidence"],
            "window_mean": float(current["confidence"].mean()),
            "reference_mean": float(reference["confidence"].mean()),
        },
        "unsure_share": {
            "drift": window_unsure - reference_unsure > params.max_unsure_increase,
            "window": window_unsure,
            "reference": reference_unsure,
            "increase": window_unsure - reference_unsure,
            "max_increase": params.max_unsure_increase,
        },
        "input_statistics": {
            "drift": len(drifted) / len(STATISTICS) >= params.drift_share,
            "method": statistic_method["method"],
            "threshold": statistic_method["threshold"],
            "drifted": drifted,
            "drifted_share": len(drifted) / len(STATISTICS),
            "drift_share": params.drift_share,
            "columns": {
                name: {
                    "score": drift[name]["score"],
                    "drift": drift[name]["drift"],
                    "window_mean": float(current[name].mean()),
                    "reference_mean": float(reference[name].mean()),
                }
                for name in STATISTICS
            },
        },
    }


def feedback_check(by_version: dict[str, dict[str, float]], params: MonitorParams) -> dict[str, Any]:
    """Drift when a version with at least ``min_feedback`` accepted corrections in the window is below the floor;
    None when no version has that many."""
    judged = {version: row for version, row in by_version.items() if row["feedback"] >= params.min_feedback}
    low = [version for version, row in judged.items() if row["accuracy"] < params.min_feedback_accuracy]
    return {
        "drift": bool(low) if judged else None,
        "below_floor": low,
        "min_feedback": params.min_feedback,
        "min_accuracy": params.min_feedback_accuracy,
        "versions": by_version,
    }


def verdict(checks: dict[str, dict[str, Any]], predictions: int, min_predictions: int) -> tuple[bool, str]:
    """(drift, why): drift when any check found it, never over fewer than ``min_predictions`` answers."""
    if predictions < min_predictions:
        return False, f"too few predictions: {predictions} in the window, {min_predictions} needed for a verdict"
    flagged = [name for name, check in checks.items() if check.get("drift")]
    if flagged:
        return True, "drift: " + ", ".join(flagged)
    return False, "no drift"


def retrain_reason(drift: bool, feedback_ready: int, min_feedback_to_retrain: int) -> str | None:
    """What should start a retrain now: ``"drift"``, ``"feedback"`` (enough accepted corrections wait), or None."""
    if drift:
        return "drift"
    if feedback_ready >= min_feedback_to_retrain:
        return "feedback"
    return None


def figures(report: dict[str, Any]) -> dict[str, float]:
    """The report's numbers as flat metric names (MLflow): verdict, counts, and each check's figures."""
    out = {"drift": float(report["drift"]), "predictions": report["predictions"], "feedback_ready": report["feedback_ready"]}
    checks = report["checks"]
    for name, check in checks.items():
        if check.get("drift") is not None:
            out[f"{name}_drift"] = float(check["drift"])
    if "score" in checks.get("predicted_class", {}):
        predicted = checks["predicted_class"]
        out["predicted_class_score"] = predicted["score"]
        out |= {f"digit_{d}_share": share for d, share in predicted["window"].items()}
        out |= {f"reference_digit_{d}_share": share for d, share in predicted["reference"].items()}
        confidence = checks["confidence"]
        out |= {
            "confidence_score": confidence["score"],
            "confidence_mean": confidence["window_mean"],
            "reference_confidence_mean": confidence["reference_mean"],
        }
        unsure = checks["unsure_share"]
        out |= {"unsure_share": unsure["window"], "reference_unsure_share": unsure["reference"]}
        inputs = checks["input_statistics"]
        out["input_statistics_drifted_share"] = inputs["drifted_share"]
        for stat, column in inputs["columns"].items():
            out |= {f"{stat}_score": column["score"], f"{stat}_mean": column["window_mean"]}
            out[f"reference_{stat}_mean"] = column["reference_mean"]
    for version, row in checks.get("feedback_accuracy", {}).get("versions", {}).items():
        out |= {f"feedback_v{version}": row["feedback"], f"feedback_accuracy_v{version}": row["accuracy"]}
    return {key: float(value) for key, value in out.items()}


# ---------------------------------------------------------------- the report


def write_summary(path: Path, report: dict[str, Any], images: list[str], evidently_html: str | None) -> None:
    """A page a person reads first: the verdict, every check, the figures (``images`` beside it), and a link to
    Evidently's report (``evidently_html``, beside it too) when there is one."""

    def cell(value: Any) -> str:
        return html.escape(value if isinstance(value, str) else _short(value))

    rows = "".join(
        f"<tr><td>{cell(name)}</td><td class='{_CSS[check.get('drift')]}'>{state_of(check.get('drift'))}</td>"
        f"<td>{cell(describe_check(name, check))}</td></tr>"
        for name, check in report["checks"].items()
    )
    reference = report.get("reference")
    facts = [
        ("verdict", report["verdict"]),
        ("window", f"{report['window']}: {report['since']} to {report['until']} UTC"),
        ("predictions", f"{report['predictions']:,}" + versions_text(report.get("by_version", {}))),
        (
            "reference",
            f"champion v{reference['version']}: {reference['images']:,} {reference['source']} ({reference['runtime']}), "
            f"accuracy {reference['accuracy']:.2%}"
            if reference
            else "none (no comparison)",
        ),
        ("corrections ready", f"{report['feedback_ready']:,} (retrain from {report['min_feedback_to_retrain']:,})"),
    ]
    page = [
        "<!doctype html><html><head><meta charset='utf-8'><title>digits monitoring</title><style>",
        "body{font-family:sans-serif;margin:2em;max-width:1200px}td,th{padding:4px 10px;text-align:left;vertical-align:top}",
        "table{border-collapse:collapse}tr{border-bottom:1px solid #ddd}.drift{color:#b00;font-weight:bold}.ok{color:#070}",
        "img{max-width:100%}</style></head><body>",
        f"<h1>Monitoring: {'DRIFT' if report['drift'] else 'no drift'}</h1>",
        "<table>" + "".join(f"<tr><th>{cell(k)}</th><td>{cell(v)}</td></tr>" for k, v in facts) + "</table>",
        "<h2>Checks</h2><table><tr><th>check</th><th>state</th><th>figures</th></tr>" + rows + "</table>",
        *(f"<p><img src='{html.escape(name)}' alt='{html.escape(name)}'></p>" for name in images),
    ]
    if evidently_html:
        page.append(f"<p><a href='{html.escape(evidently_html)}'>Evidently's drift report, column by column</a></p>")
    page.append("</body></html>")
    path.write_text("\n".join(page), encoding="utf-8")


def describe_check(name: str, check: dict[str, Any]) -> str:
    """One line of figures for a check, the same in the summary page, the CLI and the Prefect artifact."""
    if name == "feedback_accuracy":
        versions = "; ".join(
            f"v{v}: {row['correct']} of {row['feedback']} right ({row['accuracy']:.1%})" for v, row in check["versions"].items()
        )
        return (versions or "no accepted corrections in the window") + (
            f"; judged from {check['min_feedback']} corrections a version, floor {check['min_accuracy']:.0%}"
        )
    if "reason" in check:
        return check["reason"]
    test = f"{check.get('method')}, threshold {check.get('threshold')}"
    if name == "predicted_class":
        moved = sorted(range(10), key=lambda d: -abs(check["window"][str(d)] - check["reference"][str(d)]))[:3]
        shares = ", ".join(f"{d}: {check['window'][str(d)]:.1%} vs {check['reference'][str(d)]:.1%}" for d in moved)
        return f"score {_short(check['score'])} ({test}); most moved {shares}"
    if name == "confidence":
        return f"mean {check['window_mean']:.3f} vs {check['reference_mean']:.3f}; score {_short(check['score'])} ({test})"
    if name == "unsure_share":
        return (
            f"{check['window']:.1%} vs {check['reference']:.1%} ({100 * check['increase']:+.1f} points; "
            f"at most +{100 * check['max_increase']:.0f})"
        )
    if name == "input_statistics":
        drifted = ", ".join(check["drifted"]) or "none"
        return (
            f"{len(check['drifted'])} of {len(check['columns'])} drifted ({test}; drift from {check['drift_share']:.0%}): "
            f"{drifted}"
        )
    return ""


def state_of(drift: bool | None) -> str:
    """A check's state in words."""
    return "not judged" if drift is None else ("drift" if drift else "ok")


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if value else "0"
    return str(value)


def versions_text(by_version: dict[str, int]) -> str:
    """`` (v1: 120, v2: 3,400)`` after a count of answers; nothing without versions."""
    return " (" + ", ".join(f"v{v}: {n:,}" for v, n in by_version.items()) + ")" if by_version else ""
