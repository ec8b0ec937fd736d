"""The prediction log on a real SQLite database: schema, writer, corrections, retention, statistics."""

from __future__ import annotations

import gc
import threading
import time
from datetime import timedelta

import numpy as np
import pytest
import sqlalchemy as sa

from pipeline import prediction_log
from pipeline.image_stats import image_statistics
from pipeline.monitoring import read_window

ANSWER = {
    "digit": 3,
    "confidence": 0.8,
    "unsure": True,
    "probabilities": [0.02] * 9 + [0.82],
    "model_name": "digits-cnn",
    "model_version": "2",
    "run_id": "abc",
}


@pytest.fixture
def engine(tmp_path):
    engine = prediction_log.open_log(f"sqlite:///{tmp_path / 'logs' / 'predictions.db'}")
    yield engine
    engine.dispose()


def _bar(top: int = 4, left: int = 12, height: int = 20, width: int = 4) -> np.ndarray:
    image = np.zeros((28, 28), np.float32)
    image[top : top + height, left : left + width] = 255
    return image


def _answered(count: int, answer: dict = ANSWER, at=None) -> prediction_log.Answered:
    """One request's ``count`` answers, as the service logs them."""
    ids = [prediction_log.new_request_id() for _ in range(count)]
    return prediction_log.answered(ids, "pixels", [answer] * count, "tflite", np.stack([_bar()] * count), at=at)


def _count(engine, table=prediction_log.predictions) -> int:
    with engine.connect() as connection:
        return connection.execute(sa.select(sa.func.count()).select_from(table)).scalar()


def test_the_migrations_build_exactly_the_schema_the_code_queries(engine):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), prediction_log.metadata) == []
        assert connection.execute(sa.text("PRAGMA journal_mode")).scalar() == "wal"
    # opening again (a second replica) finds the schema at its latest revision and changes nothing
    prediction_log.open_log(str(engine.url)).dispose()


def test_replicas_starting_together_migrate_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'predictions.db'}"
    errors: list[Exception] = []

    def open_one() -> None:
        try:
            prediction_log.open_log(url).dispose()
        except Exception as err:  # collected: the test fails below with what went wrong
            errors.append(err)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_an_unusable_database_is_named_with_the_reason(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the log's folder should be")
    with pytest.raises(prediction_log.PredictionLogError, match="cannot be opened.*DIGITS_LOG_DB_URL"):
        prediction_log.open_log(f"sqlite:///{blocker / 'predictions.db'}")
    with pytest.raises(prediction_log.PredictionLogError, match="not a database URL"):
        prediction_log.open_log("no-such-scheme:/x")


def test_the_writer_writes_answers_in_batches_and_their_images(engine):
    writer = prediction_log.LogWriter(engine, batch_size=7).start()
    requests = [_answered(count) for count in (1, 3, 2, 8, 6)]
    assert all(writer.submit(request) == 0 for request in requests)
    assert writer.flush(timeout=30)
    writer.close()
    stats = writer.stats()
    assert {name: stats[name] for name in ("written", "dropped", "failed", "queued")} == {
        "written": 20,
        "dropped": 0,
        "failed": 0,
        "queued": 0,
    }
    assert stats["cpu_seconds"] > 0  # the thread's own CPU time, counted while it wrote
    with engine.connect() as connection:
        row = connection.execute(
            sa.select(prediction_log.predictions).where(prediction_log.predictions.c.request_id == requests[3].request_ids[5])
        ).one()
    assert (row.route, row.digit, row.model_version, row.runtime, row.unsure) == ("pixels", 3, "2", "tflite", True)
    assert row.probabilities == ANSWER["probabilities"]
    np.testing.assert_array_equal(prediction_log.image_of(row.image), _bar())
    # the monitor reads the input statistics off the stored images
    window = read_window(engine, prediction_log.utc_now() - timedelta(hours=1), prediction_log.utc_now())
    assert len(window) == 20
    assert {tuple(box) for box in window[["box_top", "box_left", "box_bottom", "box_right"]].to_numpy()} == {(4, 12, 23, 15)}
    assert window.ink_share.tolist() == pytest.approx([80 / 784] * 20)


def test_queued_answers_give_the_garbage_collector_nothing_to_rescan():
    logged = _answered(3)
    gc.collect()  # a collection stops tracking tuples of numbers and strings
    assert [part for part in (logged.request_ids, *logged.answers) if gc.is_tracked(part)] == []
    fields = len(prediction_log.ANSWER_FIELDS)
    assert (
        dict(zip(prediction_log.ANSWER_FIELDS, logged.answers[0][:fields], strict=True))
        | {"probabilities": list(logged.answers[0][fields:])}
        == ANSWER
    )


def test_a_full_queue_drops_and_counts_without_waiting(engine):
    writer = prediction_log.LogWriter(engine, capacity=10)  # not started: nothing drains the queue
    started = time.perf_counter()
    dropped = [writer.submit(_answered(count)) for count in (4, 4, 3, 2, 12)]
    assert time.perf_counter() - started < 1.0  # a bound far above a few puts, far below any wait
    # a request's answers are kept or dropped together: the third and fifth do not fit
    assert dropped == [0, 0, 3, 0, 12] and writer.stats()["dropped"] == 15 and writer.stats()["queued"] == 10
    writer.start().close()  # closing drains what was queued
    assert _count(engine) == 10 and writer.written == 10


def test_a_flush_does_not_wait_out_the_writers_linger(engine):
    writer = prediction_log.LogWriter(engine, linger=60).start()
    writer.submit(_answered(2))
    time.sleep(0.3)  # the writer has taken the first request and lingers for more
    writer.submit(_answered(3))
    started = time.perf_counter()
    assert writer.flush(timeout=20)  # far below the linger: only a flush that ends it returns True
    assert _count(engine) == 5
    # a later flush waits for the later answers, not for the linger either
    writer.submit(_answered(4))
    assert writer.flush(timeout=20) and _count(engine) == 9
    assert time.perf_counter() - started < 20
    writer.close()


def test_a_full_batch_already_waiting_is_written_without_lingering(engine):
    writer = prediction_log.LogWriter(engine, batch_size=10, linger=60)  # not started: the requests wait in the queue
    for count in (10, 10, 10, 10, 5):
        writer.submit(_answered(count))
    writer.start()
    deadline = time.monotonic() + 20  # far below the linger
    while writer.written < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    # four full batches went at once; the last five answers, less than a batch, wait for company
    assert writer.written == 40 and writer.stats()["queued"] == 5
    writer.close()
    assert _count(engine) == 45


def test_batches_of_any_size_share_a_few_statements(engine):
    """The driver keeps every SQL text it saw prepared, so the writer's must not take a new shape per batch size."""
    statements: set[str] = set()
    sa.event.listen(engine, "before_cursor_execute", lambda _c, _cur, sql, *_: statements.add(sql))
    for size in range(1, 301):
        columns = prediction_log.prediction_columns([_answered(size)])
        with engine.begin() as connection:
            prediction_log.insert_columns(connection, prediction_log.predictions, columns)
    inserts = {sql for sql in statements if sql.startswith("INSERT INTO predictions")}
    assert len(inserts) <= 9  # a statement of 1, 2, 4, ..., 256 rows
    assert _count(engine) == sum(range(1, 301))


def test_closing_the_writer_drains_the_queue(engine):
    writer = prediction_log.LogWriter(engine, batch_size=50).start()
    for _ in range(50):
        writer.submit(_answered(10))
    writer.close()
    assert _count(engine) == 500 and writer.stats()["queued"] == 0


def test_a_database_that_refuses_writes_costs_entries_not_answers(engine):
    with engine.begin() as connection:
        connection.execute(sa.text("DROP TABLE feedback"))
        connection.execute(sa.text("DROP TABLE predictions"))
    writer = prediction_log.LogWriter(engine).start()
    assert writer.submit(_answered(3)) == 0
    assert writer.flush(timeout=30)  # the writer goes on: the batch is counted as failed
    assert writer.stats()["failed"] == 3
    writer.close()


def test_a_correction_is_recorded_once_for_a_known_answer(engine):
    writer = prediction_log.LogWriter(engine).start()
    answered = _answered(2)
    writer.submit(answered)
    writer.close()
    first, second = answered.request_ids

    recorded = prediction_log.record_feedback(engine, first, 7, client=prediction_log.client_digest("10.0.0.1"))
    assert recorded == {
        "request_id": first,
        "label": 7,
        "digit": 3,
        "correct": False,
        "model_version": "2",
        "status": "accepted",
    }
    with pytest.raises(prediction_log.AlreadyCorrected, match="already corrected to 7") as again:
        prediction_log.record_feedback(engine, first, 3)
    assert again.value.status == 409
    with pytest.raises(prediction_log.UnknownRequest) as unknown:
        prediction_log.record_feedback(engine, "f" * 32, 3)
    assert unknown.value.status == 404
    for label in (10, -1, "x", "12", True, None, 3.0):
        with pytest.raises(prediction_log.FeedbackRefused, match="label must be a digit 0-9") as bad:
            prediction_log.record_feedback(engine, second, label)
        assert bad.value.status == 422
    with pytest.raises(prediction_log.FeedbackRefused, match="request_id must be"):
        prediction_log.record_feedback(engine, "", 3)
    assert prediction_log.record_feedback(engine, second, "3")["correct"] is True
    assert _count(engine, prediction_log.feedback) == 2  # nothing of the refused ones was stored

    summary = prediction_log.feedback_summary(engine)
    assert summary["answers"] == 2 and summary["feedback"] == 2 and summary["ready_to_harvest"] == 2
    assert summary["by_label"]["7"] == 1 and summary["by_label"]["3"] == 1 and summary["by_label"]["0"] == 0
    assert summary["by_version"] == {"2": {"feedback": 2, "correct": 1, "accuracy": 0.5}}


def test_pruning_keeps_recent_and_corrected_answers(engine):
    writer = prediction_log.LogWriter(engine).start()
    old, recent = _answered(3, at=prediction_log.utc_now() - timedelta(days=40)), _answered(1)
    writer.submit(old)
    writer.submit(recent)
    writer.close()
    prediction_log.record_feedback(engine, old.request_ids[0], 5)

    assert prediction_log.prune(engine, days=30) == 2  # the two old ones nobody corrected
    with engine.connect() as connection:
        kept = set(connection.execute(sa.select(prediction_log.predictions.c.request_id)).scalars())
    assert kept == {old.request_ids[0], recent.request_ids[0]}


def test_image_statistics_of_constructed_digits():
    thin, thick, empty = _bar(width=2), _bar(width=6), np.zeros((28, 28), np.float32)
    stats = image_statistics(np.stack([thin, thick, empty]))
    assert stats["stroke_width"][0] < stats["stroke_width"][1]
    # a bar of width w and height 20: area 20w over an outline of 2*20 + 2*(w-2) pixels, doubled
    assert stats["stroke_width"][1] == pytest.approx(2 * 120 / (40 + 8))
    assert stats["centre_row"][0] == pytest.approx(13.5) and stats["centre_col"][0] == pytest.approx(12.5)
    assert stats["ink_share"][2] == 0 and stats["box_top"][2] == -1 and stats["stroke_width"][2] == 0
    assert (stats["box_top"][1], stats["box_bottom"][1], stats["box_left"][1], stats["box_right"][1]) == (4, 23, 12, 17)


def test_uploads_are_kept_only_when_configured_and_within_the_cap(tmp_path):
    from PIL import Image

    from serving.service import _read_upload

    path = tmp_path / "digit.png"
    Image.fromarray(_bar().astype(np.uint8)).resize((100, 100)).save(path)
    size = path.stat().st_size
    assert _read_upload(path)[1] is None  # the default keeps none
    assert _read_upload(path, keep_bytes=size)[1] == path.read_bytes()
    digit, kept = _read_upload(path, keep_bytes=size - 1)
    assert kept is None and digit.shape == (28, 28)


def test_untrusted_corrections_wait_for_review(engine):
    confident = {**ANSWER, "confidence": 0.99, "unsure": False}
    writer = prediction_log.LogWriter(engine).start()
    answered = _answered(5, confident)
    writer.submit(answered)
    writer.close()
    ids = answered.request_ids
    policy = prediction_log.FeedbackPolicy(quarantine_confidence=0.95, client_daily_cap=3)

    # agreeing with a confident answer counts; contradicting it waits, with the reason
    assert prediction_log.record_feedback(engine, ids[0], 3, "a", policy)["status"] == "accepted"
    held = prediction_log.record_feedback(engine, ids[1], 8, "a", policy)
    assert held["status"] == "quarantined" and held["reason"] == "contradicts an answer given with 99.0% confidence"
    # a sender's corrections beyond the daily cap wait too, even when they agree; another sender's do not
    assert prediction_log.record_feedback(engine, ids[2], 3, "a", policy)["status"] == "accepted"
    capped = prediction_log.record_feedback(engine, ids[3], 3, "a", policy)
    assert capped["status"] == "quarantined" and "already sent 3 corrections" in capped["reason"]
    assert prediction_log.record_feedback(engine, ids[4], 3, "b", policy)["status"] == "accepted"

    summary = prediction_log.feedback_summary(engine)
    assert (summary["ready_to_harvest"], summary["quarantined"], summary["rejected"]) == (3, 2, 0)
    waiting = prediction_log.quarantined(engine)
    assert [row["request_id"] for row in waiting] == [ids[1], ids[3]]
    assert waiting[0]["label"] == 8 and waiting[0]["digit"] == 3
    np.testing.assert_array_equal(prediction_log.image_of(waiting[0]["image"]), _bar())

    assert prediction_log.review(engine, [waiting[1]["id"]], approve=True) == 1
    assert prediction_log.review(engine, None, approve=False) == 1  # the rest: the contradicting one
    assert prediction_log.review(engine, None, approve=True) == 0  # nothing waits any more
    summary = prediction_log.feedback_summary(engine)
    assert (summary["ready_to_harvest"], summary["quarantined"], summary["rejected"]) == (4, 0, 1)


def test_a_held_correction_is_shown_with_a_sketch_of_its_digit():
    from app.feedback import render_held, sketch

    lines = sketch(_bar(top=4, left=12, height=20, width=4).astype(np.uint8))
    assert len(lines) == 14 and lines[1] == "" and lines[2] == "      ##" and lines[11] == "      ##" and lines[12] == ""
    text = render_held(
        [
            {
                "id": 7,
                "label": 8,
                "digit": 3,
                "confidence": 0.99,
                "model_version": "2",
                "reason": "contradicts an answer given with 99.0% confidence",
                "image": _bar().astype(np.uint8).tobytes(),
            }
        ]
    )
    assert text.startswith("#7  labelled 8; v2 answered 3 (99.0%)\n     held: contradicts") and "--approve ID" in text


def test_the_challenger_is_compared_with_the_served_answers(engine):
    writer = prediction_log.LogWriter(engine).start()
    answered = _answered(4)  # the champion (v2) answered 3 to all four
    writer.submit(answered)
    ids = answered.request_ids
    challenger = [{**ANSWER, "model_version": "5", "digit": digit} for digit in (3, 3, 8, 8)]
    writer.submit(prediction_log.shadow_answered(ids, challenger, "tflite"))
    writer.close()
    prediction_log.record_feedback(engine, ids[0], 3)  # both right
    prediction_log.record_feedback(engine, ids[2], 8)  # only the challenger right

    found = prediction_log.shadow_comparison(engine, "5")
    assert found == {
        "challenger_version": "5",
        "versions_it_shadowed": ["2"],
        "requests": 4,
        "agreement": 0.5,
        "feedback": 2,
        "served_accuracy_on_feedback": 0.5,
        "challenger_accuracy_on_feedback": 1.0,
    }
    assert prediction_log.shadow_comparison(engine, "6")["requests"] == 0
