"""Great Expectations validation on a slice of the real MNIST (no mocks): clean data passes, each
kind of damage fails with a sentence that names the expectation and the offending values."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import Dataset
from pipeline.params import ValidationParams
from pipeline.validation import DataValidationError, ValidationReport, image_table, validate_dataset

N_TRAIN, N_TEST = 2000, 500
# the slice is small: only the row counts need lowering, every other bound keeps its default
SLICE_PARAMS = ValidationParams(min_train_rows=N_TRAIN, min_test_rows=N_TEST)


@pytest.fixture(scope="module")
def mnist_head(mnist) -> Dataset:
    # copies, so a test that damages its arrays cannot leak into another test
    head = mnist.head(N_TRAIN, N_TEST)
    return Dataset(head.x_train.copy(), head.y_train.copy(), head.x_test.copy(), head.y_test.copy())


@pytest.fixture(autouse=True)
def data_docs_render_cleanly(caplog: pytest.LogCaptureFixture):
    """GX logs (and swallows) Data Docs rendering errors: a report with holes must fail the test."""
    yield
    errors = [r.getMessage() for r in caplog.records if r.name.startswith("great_expectations") and r.levelname == "ERROR"]
    assert not errors, errors[0]


def copy_of(ds: Dataset) -> Dataset:
    return Dataset(ds.x_train.copy(), ds.y_train.copy(), ds.x_test.copy(), ds.y_test.copy())


def failures_about(report: ValidationReport, subject: str) -> list[str]:
    return [f for f in report.failures if f.startswith(subject + ":")]


def only_failure_about(report: ValidationReport, subject: str) -> str:
    found = failures_about(report, subject)
    assert len(found) == 1, f"expected one failure about {subject!r}, got: {report.failures}"
    return found[0]


def test_image_table_has_one_row_per_image() -> None:
    x = np.zeros((3, 28, 28), np.uint8)
    x[1, :14] = 255  # half the pixels inked
    x[2] = x[1]
    table = image_table(x, np.array([0, 1, 9], np.uint8), "test")
    assert list(table.columns) == [
        "split", "label", "height", "width", "dtype",
        "pixel_min", "pixel_max", "pixel_mean", "ink_fraction", "content_hash",
    ]  # fmt: skip
    assert list(table.index) == ["test/0", "test/1", "test/2"]
    assert table["label"].tolist() == [0, 1, 9] and str(table["label"].dtype) == "int64"
    assert table["ink_fraction"].tolist() == [0.0, 0.5, 0.5]
    assert table["pixel_max"].tolist() == [0, 255, 255] and table["pixel_mean"].tolist() == [0.0, 127.5, 127.5]
    assert (table["height"] == 28).all() and (table["width"] == 28).all() and (table["dtype"] == "uint8").all()
    assert table.at["test/1", "content_hash"] == table.at["test/2", "content_hash"] != table.at["test/0", "content_hash"]


def test_clean_slice_passes_and_writes_the_html_report(mnist_head: Dataset, tmp_path: Path) -> None:
    report = validate_dataset(mnist_head, SLICE_PARAMS, tmp_path)
    assert report.success, report.summary()
    assert report.failures == []
    assert report.report_html == tmp_path.resolve() / "data_docs" / "index.html"
    assert report.report_html.is_file()
    pages = list((report.report_html.parent / "validations").rglob("*.html"))
    assert len(pages) == 1 and "mnist_dataset" in pages[0].read_text()
    stats = report.statistics
    assert stats["rows_train"] == N_TRAIN and stats["rows_test"] == N_TEST
    assert stats["duplicates_train"] == stats["duplicates_test"] == stats["train_test_overlap"] == 0
    assert stats["expectations_evaluated"] >= 25 and stats["expectations_failed"] == 0
    assert stats["class_count_min_train"] > 0.06 * N_TRAIN
    assert "Data validation passed" in report.summary()


def test_a_second_run_replaces_the_report(mnist_head: Dataset, tmp_path: Path) -> None:
    validate_dataset(mnist_head, SLICE_PARAMS, tmp_path)
    report = validate_dataset(mnist_head, SLICE_PARAMS, tmp_path)
    assert len(list((report.report_html.parent / "validations").rglob("*.html"))) == 1


def test_label_outside_0_to_9_fails_naming_the_values(mnist_head: Dataset, tmp_path: Path) -> None:
    ds = copy_of(mnist_head)
    ds.y_train[[5, 7, 9]] = 11
    ds.y_test[3] = 255
    report = validate_dataset(ds, SLICE_PARAMS, tmp_path)
    assert not report.success
    failure = only_failure_about(report, "label")
    assert failure.startswith("label: values must be in 0..9; found 11 (3 rows), 255 (1 row) in 4 of 2500 rows")
    assert "e.g. train/5, train/7, train/9, test/3" in failure
    assert "expect_column_values_to_be_in_set" in failure
    # the 11s replaced other digits, so the training split now holds 11 distinct labels
    assert "found 11 distinct labels; unexpected label 11" in only_failure_about(report, "label (train)")
    assert "label: values must be in 0..9; found 11 (3 rows)" in report.summary()


def test_a_missing_class_fails(mnist_head: Dataset, tmp_path: Path) -> None:
    keep = mnist_head.y_train != 7
    ds = Dataset(mnist_head.x_train[keep], mnist_head.y_train[keep], mnist_head.x_test, mnist_head.y_test)
    params = ValidationParams(min_train_rows=int(keep.sum()), min_test_rows=N_TEST)
    report = validate_dataset(ds, params, tmp_path)
    assert not report.success
    assert report.failures == [
        "label (train): all ten classes 0..9 present; found 9 distinct labels; missing class 7 "
        "(expect_column_unique_value_count_to_be_between)"
    ]
    assert report.statistics["class_count_min_train"] == 0


def test_a_rare_class_fails_the_balance_check(mnist_head: Dataset, tmp_path: Path) -> None:
    threes = np.flatnonzero(mnist_head.y_train == 3)
    keep = np.ones(N_TRAIN, bool)
    keep[threes[10:]] = False  # ten 3s left: far below 6% of the split
    ds = Dataset(mnist_head.x_train[keep], mnist_head.y_train[keep], mnist_head.x_test, mnist_head.y_test)
    report = validate_dataset(ds, ValidationParams(min_train_rows=100, min_test_rows=N_TEST), tmp_path)
    failure = only_failure_about(report, "class_share (train)")
    rows = int(keep.sum())
    assert failure.startswith(
        f"class_share (train): every class must hold at least 6.0% of the split; class 3 holds {10 / rows:.2%} "
        f"(10 of {rows} images)"
    )
    assert "expect_column_min_to_be_between" in failure
    assert len(report.failures) == 1


def test_train_test_overlap_fails(mnist_head: Dataset, tmp_path: Path) -> None:
    ds = copy_of(mnist_head)
    ds.x_train[100:105], ds.y_train[100:105] = ds.x_test[:5], ds.y_test[:5]
    report = validate_dataset(ds, SLICE_PARAMS, tmp_path)
    assert not report.success
    failure = only_failure_about(report, "in_train_and_test (test)")
    assert failure.startswith(
        "in_train_and_test (test): at most 0 test images may also be in train; found 5, "
        "e.g. test/0 = train/100, test/1 = train/101"
    )
    assert "expect_column_sum_to_be_between" in failure
    assert report.statistics["train_test_overlap"] == 5
    assert len(report.failures) == 1
    # a tolerated overlap passes
    assert validate_dataset(ds, SLICE_PARAMS.model_copy(update={"max_train_test_overlap": 5}), tmp_path).success


def test_duplicates_beyond_tolerance_fail(mnist_head: Dataset, tmp_path: Path) -> None:
    ds = copy_of(mnist_head)
    ds.x_train[1:21], ds.y_train[1:21] = ds.x_train[0], ds.y_train[0]  # 20 extra copies: 1% > 0.1%
    report = validate_dataset(ds, SLICE_PARAMS, tmp_path)
    assert not report.success
    failure = only_failure_about(report, "content_hash (train)")
    assert failure.startswith(
        "content_hash (train): at most 0.10% exact duplicate images; found 1.00% (20 extra copies among 2000 images"
    )
    assert "e.g. train/0=train/1=train/2" in failure
    assert "expect_column_proportion_of_unique_values_to_be_between" in failure
    assert report.statistics["duplicates_train"] == 20
    assert len(report.failures) == 1


def test_duplicates_within_tolerance_pass(mnist_head: Dataset, tmp_path: Path) -> None:
    ds = copy_of(mnist_head)
    ds.x_train[1], ds.y_train[1] = ds.x_train[0], ds.y_train[0]  # one copy in 2000: 0.05%
    report = validate_dataset(ds, SLICE_PARAMS, tmp_path)
    assert report.success, report.summary()
    assert report.statistics["duplicates_train"] == 1


def test_blank_images_beyond_tolerance_fail(mnist_head: Dataset, tmp_path: Path) -> None:
    ds = copy_of(mnist_head)
    ds.x_test[[10, 20, 30, 40]] = 0  # 4 of 500 = 0.8% blank, tolerance 0.1%
    report = validate_dataset(ds, SLICE_PARAMS, tmp_path)
    assert not report.success
    failure = only_failure_about(report, "ink_fraction (test)")
    assert failure.startswith("ink_fraction (test): share of inked pixels between 0.02 and 0.6 for at least 99.9% of images")
    assert "found 0 (4 rows) in 4 of 500 rows (0.8%), e.g. test/10, test/20, test/30, test/40" in failure
    assert "expect_column_values_to_be_between" in failure
    assert report.statistics["ink_outside_test"] == 4
    # four identical blank images are also three duplicates (0.6% of the test split)
    assert only_failure_about(report, "content_hash (test)")
    assert len(report.failures) == 2


def test_a_blank_image_within_tolerance_passes(mnist_head: Dataset, tmp_path: Path) -> None:
    ds = copy_of(mnist_head)
    ds.x_train[10] = 0  # 1 of 2000 = 0.05%: the odd real-world outlier is tolerated
    report = validate_dataset(ds, SLICE_PARAMS, tmp_path)
    assert report.success, report.summary()
    assert report.statistics["ink_outside_train"] == 1


def test_too_few_rows_fail(mnist_head: Dataset, tmp_path: Path) -> None:
    report = validate_dataset(mnist_head, ValidationParams(), tmp_path)  # defaults: 60,000 / 10,000
    assert not report.success
    assert report.failures == [
        "rows (train): at least 60,000 images; found 2000 (expect_table_row_count_to_be_between)",
        "rows (test): at least 10,000 images; found 500 (expect_table_row_count_to_be_between)",
    ]
    assert report.statistics["expectations_failed"] == 2


def test_wrong_image_type_and_size_fail(mnist_head: Dataset, tmp_path: Path) -> None:
    ds = copy_of(mnist_head)
    ds = Dataset(ds.x_train.astype(np.float32) / 255, ds.y_train, ds.x_test[:, :27, :27].copy(), ds.y_test)
    report = validate_dataset(ds, SLICE_PARAMS, tmp_path)
    assert only_failure_about(report, "dtype").startswith(
        "dtype: images must be uint8; found float32 in 2000 of 2500 rows (80%) (values seen in the first 50), "
        "e.g. train/0, train/1"
    )
    assert only_failure_about(report, "height").startswith("height: images must be 28 pixels; found 27 in 500 of 2500")
    assert only_failure_about(report, "width").startswith("width: images must be 28 pixels; found 27 in 500 of 2500")


def test_error_carries_the_report_and_survives_pickling(mnist_head: Dataset, tmp_path: Path) -> None:
    report = validate_dataset(mnist_head, ValidationParams(), tmp_path)
    err = DataValidationError(report)
    assert err.report is report
    assert "Data validation FAILED" in str(err) and "rows (train): at least 60,000 images; found 2000" in str(err)
    clone = pickle.loads(pickle.dumps(err))
    assert clone.report == report and str(clone) == str(err)


def _with_feedback(ds: Dataset, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> Dataset:
    return Dataset(ds.x_train, ds.y_train, ds.x_test, ds.y_test, x_train, y_train, x_test, y_test)


def test_harvested_feedback_is_validated_beside_mnist(mnist, mnist_head: Dataset, tmp_path: Path) -> None:
    # corrections stand in as MNIST training images beyond the slice: real digits, new to the slice
    extra_x, extra_y = mnist.x_train[N_TRAIN : N_TRAIN + 40].copy(), mnist.y_train[N_TRAIN : N_TRAIN + 40].copy()
    clean = _with_feedback(mnist_head, extra_x[:30], extra_y[:30], extra_x[30:], extra_y[30:])
    report = validate_dataset(clean, SLICE_PARAMS, tmp_path)
    assert report.success, report.failures
    assert report.statistics["rows_feedback_train"] == 30 and report.statistics["rows_feedback_test"] == 10
    assert report.statistics["feedback_in_mnist_test"] == 0 and report.statistics["feedback_in_both_parts"] == 0

    # an MNIST test image among the corrections, an image in both parts, a copy within a part, a bad label
    x_train, y_train = extra_x[:30].copy(), extra_y[:30].copy()
    x_test, y_test = extra_x[30:].copy(), extra_y[30:].copy()
    x_train[0] = mnist_head.x_test[7]
    x_test[0] = x_train[5]
    x_train[2] = x_train[3]
    y_test[1] = 12
    report = validate_dataset(_with_feedback(mnist_head, x_train, y_train, x_test, y_test), SLICE_PARAMS, tmp_path)
    assert not report.success
    assert "feedback_train/0 = test/7" in only_failure_about(report, "in_mnist_test (feedback)")
    assert "feedback_test/0 = feedback_train/5" in only_failure_about(report, "in_both_feedback_parts (feedback)")
    assert "feedback_train/2=feedback_train/3" in only_failure_about(report, "content_hash (feedback_train)")
    assert "12 (1 row)" in only_failure_about(report, "label")
