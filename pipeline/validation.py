"""Validate the raw dataset with Great Expectations before anything is trained on it.

GX validates tables, not images, so every image becomes one row of :func:`image_table` (label,
shape, dtype, pixel statistics, ink, a content hash). Dataset-level facts (rows per split, label
set and balance, duplicates, train/test overlap) are real GX expectations on the same table:
per-split ones carry a ``row_condition`` on ``split``, and the two facts GX cannot derive from a
single row (class share, presence in the other split) are precomputed as columns. One table means
one suite, one ValidationDefinition, one Checkpoint and one Data Docs page with every expectation
(a Checkpoint passes the same batch parameters - the dataframe - to all its validations).

Great Expectations is imported lazily: it is slow to import, and importing this module (the
flows and the CLI do, for ``DataValidationError``) must stay cheap.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.data import Dataset
from pipeline.params import ValidationParams

log = logging.getLogger(__name__)

LABELS = list(range(10))
SPLITS = ("train", "test")
# harvested corrections (``data/feedback``), validated when a data version holds them
FEEDBACK_SPLITS = ("feedback_train", "feedback_test")
IMAGE_SIDE = 28
IMAGE_COLUMNS = [
    "split", "label", "height", "width", "dtype",
    "pixel_min", "pixel_max", "pixel_mean", "ink_fraction", "content_hash",
]  # fmt: skip
# real MNIST lies well inside the default ink bounds (0.043 ... 0.448), but added handwriting may
# hold the odd very thin or very bold digit: tolerate 0.1% outside them, not a blank-image batch
INK_MOSTLY = 0.999
# how many offending values GX reports per failed expectation (its counts cover only these)
PARTIAL_UNEXPECTED = 50
EXAMPLES = 5  # offending rows named in a failure sentence
INDEX_NAME = "image"
SITE_NAME = "mnist_validation"
SUITE_NAME = "mnist_dataset"
DOCS_DIRNAME = "data_docs"


# ---------------------------------------------------------------- the table GX validates


def image_table(x: np.ndarray, y: np.ndarray, split: str) -> pd.DataFrame:
    """One row per image; the index names the image (``train/123`` = position 123 of train)."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim < 1 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"{split}: {x.shape} images do not match {y.shape} labels (one label per image expected)")
    n = len(x)
    shape = x.shape[1:]
    # trailing dimensions fold into the width, so any layout other than (28, 28) shows as a wrong size
    height = shape[0] if shape else 0
    width = int(np.prod(shape[1:])) if len(shape) > 1 else 0
    pixels = int(np.prod(shape)) if shape else 0
    flat = np.ascontiguousarray(x.reshape(n, pixels))
    if pixels:
        pixel_min, pixel_max = flat.min(axis=1), flat.max(axis=1)
        pixel_mean = flat.mean(axis=1, dtype=np.float64)
        # unsigned/bool: "> 0" is "!= 0", and count_nonzero avoids a 55 MB temporary for MNIST
        positive = flat if flat.dtype.kind in "ub" else flat > 0
        ink = np.count_nonzero(positive, axis=1) / pixels
    else:
        pixel_min = pixel_max = pixel_mean = ink = np.full(n, np.nan)
    # integer labels of any width become int64, so the type expectation sees one type; others stay as they are
    label = y.astype(np.int64) if y.dtype.kind in "iu" else y
    table = pd.DataFrame(
        {
            "split": split,
            "label": label,
            "height": np.full(n, height, dtype=np.int64),
            "width": np.full(n, width, dtype=np.int64),
            "dtype": str(x.dtype),
            "pixel_min": _widen(pixel_min),
            "pixel_max": _widen(pixel_max),
            "pixel_mean": pixel_mean,
            "ink_fraction": ink,
            # 8 bytes are plenty to spot exact copies among 70k images; rows of a C-contiguous array hash in place
            "content_hash": [hashlib.blake2b(row, digest_size=8).hexdigest() for row in flat],
        },
        index=pd.Index([f"{split}/{i}" for i in range(n)], name=INDEX_NAME),
    )
    return table


def _widen(values: np.ndarray) -> np.ndarray:
    """uint8 minima/maxima as int64/float64, so comparisons with 0 and 255 cannot wrap around."""
    return values.astype(np.int64) if values.dtype.kind in "iub" else values.astype(np.float64)


def _dataset_table(dataset: Dataset) -> pd.DataFrame:
    """Every split in one table (feedback parts when there are any), plus the columns GX cannot compute from one row."""
    parts = [image_table(dataset.x_train, dataset.y_train, "train"), image_table(dataset.x_test, dataset.y_test, "test")]
    for split, x, y in (
        ("feedback_train", dataset.x_feedback_train, dataset.y_feedback_train),
        ("feedback_test", dataset.x_feedback_test, dataset.y_feedback_test),
    ):
        if len(x):
            parts.append(image_table(x, y, split))
    table = pd.concat(parts)
    split_size = table.groupby("split")["split"].transform("size")
    class_size = table.groupby(["split", "label"], dropna=False)["split"].transform("size")
    # share of this image's class among the images of its split (for the class balance expectation)
    table["class_share"] = class_size / split_size

    def hashes(split: str) -> pd.Series:
        return table.loc[table["split"] == split, "content_hash"]

    def where(split: str, other: str) -> np.ndarray:
        """1 for the images of ``split`` whose pixels appear in ``other``, 0 for every other row."""
        return ((table["split"] == split) & table["content_hash"].isin(hashes(other))).to_numpy()

    # 1 where the same pixels appear in the other split: a test image the model may have trained on
    table["in_train_and_test"] = (where("train", "test") | where("test", "train")).astype(np.int64)
    # a correction that is an MNIST test image would leak the test set into training and feedback-test
    table["in_mnist_test"] = (where("feedback_train", "test") | where("feedback_test", "test")).astype(np.int64)
    table["in_both_feedback_parts"] = (
        where("feedback_train", "feedback_test") | where("feedback_test", "feedback_train")
    ).astype(np.int64)
    return table


# ---------------------------------------------------------------- the report


@dataclass(frozen=True)
class ValidationReport:
    success: bool
    failures: list[str]  # one sentence per failed expectation, with the offending values
    statistics: dict[str, float | int]
    report_html: Path  # Great Expectations Data Docs index.html

    def summary(self) -> str:
        """A short markdown summary: verdict, sizes, every failure, where the full report is."""
        s = self.statistics
        verdict = "passed" if self.success else "FAILED"
        lines = [
            f"**Data validation {verdict}**: {s.get('expectations_evaluated', 0) - s.get('expectations_failed', 0)} of "
            f"{s.get('expectations_evaluated', 0)} expectations met on {s.get('rows_train', 0):,} training and "
            f"{s.get('rows_test', 0):,} test images "
            f"(duplicates: {s.get('duplicates_train', 0)} train / {s.get('duplicates_test', 0)} test; "
            f"train/test overlap: {s.get('train_test_overlap', 0)}; "
            f"class counts train {s.get('class_count_min_train', 0)}-{s.get('class_count_max_train', 0)}, "
            f"test {s.get('class_count_min_test', 0)}-{s.get('class_count_max_test', 0)})."
        ]
        lines += [f"- {failure}" for failure in self.failures]
        lines.append(f"Full report (Great Expectations Data Docs): {self.report_html}")
        return "\n".join(lines)


class DataValidationError(RuntimeError):
    """The dataset failed validation; ``.report`` says which expectations failed and why."""

    def __init__(self, report: ValidationReport) -> None:
        super().__init__(report.summary())
        self.report = report

    def __reduce__(self) -> tuple[Any, ...]:
        # rebuild from the report, not from the message (exceptions cross process boundaries pickled)
        return (type(self), (self.report,))


# ---------------------------------------------------------------- validation


def validate_dataset(dataset: Dataset, params: ValidationParams, report_dir: Path) -> ValidationReport:
    """Validate ``dataset`` with Great Expectations; the Data Docs go to ``report_dir/data_docs``.

    Never raises for bad data: the report says what failed (callers raise DataValidationError).
    """
    started = time.perf_counter()
    table = _dataset_table(dataset)
    docs_dir = Path(report_dir).resolve() / DOCS_DIRNAME
    # an ephemeral context indexes only this run: older pages would linger unlinked, so start clean
    shutil.rmtree(docs_dir, ignore_errors=True)
    docs_dir.mkdir(parents=True, exist_ok=True)

    feedback_splits = [split for split in FEEDBACK_SPLITS if (table["split"] == split).any()]
    results, gx_stats = _run_checkpoint(table, params, docs_dir, feedback_splits)
    failed = sorted((r for r in results if not r.success), key=lambda r: (r.expectation_config.meta or {}).get("order", 0))
    failures = [_describe_failure(r, table) for r in failed]
    statistics = _statistics(table, params)
    statistics["expectations_evaluated"] = int(gx_stats["evaluated_expectations"])
    statistics["expectations_failed"] = int(gx_stats["unsuccessful_expectations"])
    statistics["seconds"] = round(time.perf_counter() - started, 2)
    report_html = docs_dir / "index.html"
    if not report_html.exists():  # the UpdateDataDocsAction should have written it
        raise RuntimeError(f"Great Expectations did not write its Data Docs to {report_html}")
    success = not failed
    log.info(
        "data validation %s: %d of %d expectations failed in %.1f s",
        "passed" if success else "failed", len(failures), statistics["expectations_evaluated"], statistics["seconds"],
    )  # fmt: skip
    return ValidationReport(success, failures, statistics, report_html)


def _run_checkpoint(
    table: pd.DataFrame, params: ValidationParams, docs_dir: Path, feedback_splits: list[str]
) -> tuple[list[Any], dict]:
    """Ephemeral context -> pandas asset -> suite -> ValidationDefinition -> Checkpoint (+ Data Docs)."""
    # GX 1.24 sends no usage statistics any more; the flag keeps older 1.x releases quiet too
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        # no temporary docs site: the only site is ours, so the HTML outlives the process
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
    )
    context = gx.get_context(mode="ephemeral", project_config=config)
    context.add_data_docs_site(
        SITE_NAME,
        {
            "class_name": "SiteBuilder",
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        },
    )
    batch = (
        context.data_sources.add_pandas("mnist").add_dataframe_asset("images").add_batch_definition_whole_dataframe("all images")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=SUITE_NAME, expectations=_expectations(params, feedback_splits)))
    validation = context.validation_definitions.add(gx.ValidationDefinition(name="mnist images", data=batch, suite=suite))
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="mnist dataset",
            validation_definitions=[validation],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="update data docs", site_names=[SITE_NAME])],
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": PARTIAL_UNEXPECTED},
        )
    )
    run_id = RunIdentifier(run_name="mnist-validation", run_time=datetime.now(UTC))
    outcome = checkpoint.run(batch_parameters={"dataframe": table}, run_id=run_id)
    (run,) = outcome.run_results.values()
    return list(run.results), dict(run.statistics)


def _expectations(params: ValidationParams, feedback_splits: list[str] = ()) -> list[Any]:
    """Every expectation, each with a human rule (``notes``, shown in Data Docs) and a subject for messages.

    The feedback parts are few and unbalanced by nature: they get the checks of shape, labels,
    duplicates and ink, and must not hold an MNIST test image or an image of the other part.
    """
    import great_expectations as gx
    from great_expectations.expectations.row_conditions import Column

    E = gx.expectations
    out: list[Any] = []

    def add(expectation: Any, subject: str, rule: str, kind: str = "", split: str = "", **extra: Any) -> None:
        expectation.notes = rule
        # GX returns results grouped its own way: "order" puts failures back in suite order
        expectation.meta = {"subject": subject, "rule": rule, "kind": kind, "split": split, "order": len(out), **extra}
        out.append(expectation)

    for column in IMAGE_COLUMNS:
        add(E.ExpectColumnValuesToNotBeNull(column=column), column, "no missing values")
    add(E.ExpectColumnValuesToBeInSet(column="label", value_set=LABELS), "label", "values must be in 0..9")
    add(E.ExpectColumnValuesToBeOfType(column="label", type_="int64"), "label", "labels must be integers", "type")
    for column in ("height", "width"):
        add(E.ExpectColumnValuesToBeInSet(column=column, value_set=[IMAGE_SIDE]), column, f"images must be {IMAGE_SIDE} pixels")
    add(E.ExpectColumnValuesToBeInSet(column="dtype", value_set=["uint8"]), "dtype", "images must be uint8")
    add(E.ExpectColumnValuesToBeBetween(column="pixel_min", min_value=0), "pixel_min", "pixels must be >= 0")
    add(E.ExpectColumnValuesToBeBetween(column="pixel_max", max_value=255), "pixel_max", "pixels must be <= 255")

    min_rows = {"train": params.min_train_rows, "test": params.min_test_rows}
    min_share = params.min_class_share / len(LABELS)
    for split in SPLITS:
        only = Column("split") == split
        add(
            # Data Docs do not print a table expectation's row_condition: say which split it counts
            E.ExpectTableRowCountToBeBetween(
                min_value=min_rows[split], row_condition=only,
                description=f"If split == {split}, must have at least {min_rows[split]} rows.",
            ),
            f"rows ({split})", f"at least {min_rows[split]:,} images", "rows", split,
        )  # fmt: skip
        # ExpectColumnDistinctValuesToEqualSet would fit, but GX 1.24's Data Docs cannot render its
        # failure (KeyError 'unexpected_percent'): a distinct count of 10 + the row-level set check
        add(
            E.ExpectColumnUniqueValueCountToBeBetween(column="label", min_value=10, max_value=10, row_condition=only),
            f"label ({split})", "all ten classes 0..9 present", "label_set", split,
        )  # fmt: skip
        add(
            E.ExpectColumnMinToBeBetween(column="class_share", min_value=min_share, row_condition=only),
            f"class_share ({split})", f"every class must hold at least {min_share:.1%} of the split", "class_share", split,
            threshold=min_share,
        )  # fmt: skip
        add(
            E.ExpectColumnProportionOfUniqueValuesToBeBetween(
                column="content_hash", min_value=1 - params.max_duplicate_fraction, row_condition=only
            ),
            f"content_hash ({split})", f"at most {params.max_duplicate_fraction:.2%} exact duplicate images",
            "duplicates", split,
        )  # fmt: skip
        add(
            E.ExpectColumnValuesToBeBetween(
                column="ink_fraction", min_value=params.min_ink_fraction, max_value=params.max_ink_fraction,
                mostly=INK_MOSTLY, row_condition=only,
            ),
            f"ink_fraction ({split})",
            f"share of inked pixels between {params.min_ink_fraction:g} and {params.max_ink_fraction:g} "
            f"for at least {INK_MOSTLY:.1%} of images (lower: blank, higher: noise or inverted)",
            "", split,
        )  # fmt: skip
    add(
        E.ExpectColumnSumToBeBetween(
            column="in_train_and_test", max_value=params.max_train_test_overlap, row_condition=Column("split") == "test"
        ),
        "in_train_and_test (test)", f"at most {params.max_train_test_overlap} test images may also be in train",
        "overlap", "test", column="in_train_and_test",
    )  # fmt: skip
    for split in feedback_splits:
        only = Column("split") == split
        add(
            E.ExpectColumnProportionOfUniqueValuesToBeBetween(column="content_hash", min_value=1.0, row_condition=only),
            f"content_hash ({split})", "no image twice", "duplicates", split,
        )  # fmt: skip
        add(
            E.ExpectColumnValuesToBeBetween(
                column="ink_fraction", min_value=params.min_ink_fraction, max_value=params.max_ink_fraction, row_condition=only,
            ),
            f"ink_fraction ({split})",
            f"share of inked pixels between {params.min_ink_fraction:g} and {params.max_ink_fraction:g}", "", split,
        )  # fmt: skip
    if feedback_splits:
        add(
            E.ExpectColumnSumToBeBetween(column="in_mnist_test", max_value=0),
            "in_mnist_test (feedback)", "no correction may be an MNIST test image", "overlap", "", column="in_mnist_test",
        )  # fmt: skip
        add(
            E.ExpectColumnSumToBeBetween(column="in_both_feedback_parts", max_value=0),
            "in_both_feedback_parts (feedback)", "no image in both feedback-train and feedback-test", "overlap", "",
            column="in_both_feedback_parts",
        )  # fmt: skip
    return out


# ---------------------------------------------------------------- failures and statistics


def _describe_failure(result: Any, table: pd.DataFrame) -> str:
    """One sentence: subject (column, split), the rule, what was found, and the GX expectation type."""
    config = result.expectation_config
    meta = config.meta or {}
    subject = meta.get("subject") or config.kwargs.get("column", "table")
    rule = meta.get("rule") or config.type
    info = result.exception_info or {}
    if info.get("raised_exception"):
        found = f"could not be evaluated: {info.get('exception_message')}"
    else:
        found = _found(result.result or {}, meta, table)
    return f"{subject}: {rule}; {found} ({config.type})"


def _found(res: dict[str, Any], meta: dict[str, Any], table: pd.DataFrame) -> str:
    kind, split = meta.get("kind", ""), meta.get("split", "")
    rows = table[table["split"] == split] if split else table
    if split and kind != "rows" and rows.empty:
        return f"the {split} split holds no images"
    if kind == "label_set":
        present = set(rows["label"].dropna().tolist())
        missing = [label for label in LABELS if label not in present]
        extra = sorted((v for v in present if v not in LABELS), key=str)
        parts = [f"found {_fmt(res.get('observed_value'))} distinct labels"]
        if missing:
            parts.append("missing class " + ", ".join(str(v) for v in missing))
        if extra:
            parts.append("unexpected label " + ", ".join(_fmt(v) for v in extra))
        return "; ".join(parts)
    if "unexpected_count" in res and "partial_unexpected_counts" in res:
        return _found_rows(res)
    observed = res.get("observed_value")
    if kind == "rows":
        return f"found {_fmt(observed)}"
    if kind == "type":
        return f"found type {observed}"
    if kind == "class_share":
        shares = rows.groupby("label", dropna=False).size() / max(len(rows), 1)
        rare = shares[shares < float(meta.get("threshold", 0))].sort_values()
        listed = ", ".join(
            f"class {_fmt(k)} holds {v:.2%} ({int(round(v * len(rows)))} of {len(rows)} images)" for k, v in rare.items()
        )
        return listed or f"smallest class share {_fmt(observed)}"
    if kind == "duplicates":
        counts = rows["content_hash"].value_counts()
        copies = counts[counts > 1]
        extra = int((copies - 1).sum())
        examples = ", ".join(
            "=".join(rows.index[rows["content_hash"] == h][:3]) for h in copies.index[:EXAMPLES]
        )  # fmt: skip
        return (
            f"found {extra / max(len(rows), 1):.2%} ({extra} extra copies among {len(rows)} images; "
            f"unique share {_fmt(observed)}), e.g. {examples}"
        )
    if kind == "overlap":
        leaked = rows.index[rows[meta["column"]] == 1]
        return f"found {_fmt(observed)}, e.g. {', '.join(f'{i} = {_copy_elsewhere(table, i)}' for i in leaked[:EXAMPLES])}"
    return f"observed {_fmt(observed)}"


def _copy_elsewhere(table: pd.DataFrame, image: str) -> str:
    """The first image of another split with the same pixels as ``image``."""
    same = (table["content_hash"] == table.at[image, "content_hash"]) & (table["split"] != table.at[image, "split"])
    return next(iter(table.index[same]), "?")


def _found_rows(res: dict[str, Any]) -> str:
    """Offending values with their counts, how many rows in total, and the first offending rows by name."""
    counts = res.get("partial_unexpected_counts") or []
    shown = sum(int(c.get("count", 0)) for c in counts)
    unexpected, total = int(res.get("unexpected_count") or 0), int(res.get("element_count") or 0)
    where = f"{unexpected} of {total} rows ({100 * unexpected / max(total, 1):.3g}%)"
    if shown >= unexpected:  # GX saw every offending row: its counts are exact
        listed = ", ".join(f"{_fmt(c.get('value'))} ({c.get('count')} row{'s' if c.get('count') != 1 else ''})" for c in counts)
    else:  # GX counted only the first offending rows: name their values, not misleading counts
        listed = ", ".join(_fmt(c.get("value")) for c in counts)
        where += f" (values seen in the first {shown})"
    # with a named index GX reports each offending row as {column: value, index name: index}
    index = [i.get(INDEX_NAME, i) if isinstance(i, dict) else i for i in res.get("partial_unexpected_index_list") or []]
    examples = f", e.g. {', '.join(str(i) for i in index[:EXAMPLES])}" if index else ""
    return f"found {listed} in {where}{examples}"


def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value)


def _statistics(table: pd.DataFrame, params: ValidationParams) -> dict[str, float | int]:
    """Plain numbers for MLflow and the summary, computed with pandas from the validated table."""
    stats: dict[str, float | int] = {}
    for split in SPLITS:
        rows = table[table["split"] == split]
        counts = rows["label"].value_counts().reindex(LABELS, fill_value=0)
        ink = rows["ink_fraction"]
        stats[f"rows_{split}"] = len(rows)
        stats[f"duplicates_{split}"] = int(len(rows) - rows["content_hash"].nunique())
        stats[f"class_count_min_{split}"] = int(counts.min())
        stats[f"class_count_max_{split}"] = int(counts.max())
        stats[f"ink_outside_{split}"] = int(((ink < params.min_ink_fraction) | (ink > params.max_ink_fraction)).sum())
    stats["train_test_overlap"] = int(table.loc[table["split"] == "test", "in_train_and_test"].sum())
    for split in FEEDBACK_SPLITS:
        rows = table[table["split"] == split]
        if len(rows):
            stats[f"rows_{split}"] = len(rows)
            stats[f"duplicates_{split}"] = int(len(rows) - rows["content_hash"].nunique())
    if any(f"rows_{split}" in stats for split in FEEDBACK_SPLITS):
        stats["feedback_in_mnist_test"] = int(table["in_mnist_test"].sum())
        stats["feedback_in_both_parts"] = int(table["in_both_feedback_parts"].sum())
    return stats
