"""The prediction log: every answer the service gives, and the corrections people send back.

A SQL database through SQLAlchemy: SQLite in WAL mode under ``logs/`` in the project folder by
default, PostgreSQL (or any SQLAlchemy URL) with ``DIGITS_LOG_DB_URL``. Its schema belongs to Alembic
(``pipeline/migrations``): opening the log brings the database to the latest revision, under a lock,
so replicas that start together migrate once.

The service never waits for the database: :class:`LogWriter` takes entries on a bounded queue and
returns at once; a thread writes them in batches. When the queue is full, entries are dropped and
counted, never waited for. Closing the writer drains the queue.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import chain
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
REQUEST_ID_LENGTH = 32
# a key of our own for PostgreSQL's advisory lock around migrations
MIGRATION_LOCK_KEY = 0x64696769
FEEDBACK_ACCEPTED = "accepted"
FEEDBACK_QUARANTINED = "quarantined"  # waits for `digits feedback review`
FEEDBACK_REJECTED = "rejected"
# values bound to one INSERT: far below SQLite's limit (32,766) and PostgreSQL's (65,535)
MAX_PARAMETERS = 8_000

metadata = sa.MetaData()

predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(REQUEST_ID_LENGTH), nullable=False, unique=True),
    sa.Column("created_at", sa.DateTime, nullable=False, index=True),  # UTC
    sa.Column("route", sa.String(16), nullable=False),
    sa.Column("model_name", sa.String(255), nullable=False),
    sa.Column("model_version", sa.String(32), nullable=False),
    sa.Column("run_id", sa.String(64)),
    sa.Column("runtime", sa.String(16), nullable=False),
    sa.Column("digit", sa.SmallInteger, nullable=False),
    sa.Column("confidence", sa.Float, nullable=False),
    sa.Column("unsure", sa.Boolean, nullable=False),
    sa.Column("probabilities", sa.JSON, nullable=False),
    # the normalised 28x28 digit, uint8, row by row; the monitor computes its input statistics from it
    sa.Column("image", sa.LargeBinary, nullable=False),
    sa.Column("upload", sa.LargeBinary),  # the original upload, only when configured
)

feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(REQUEST_ID_LENGTH), sa.ForeignKey("predictions.request_id"), nullable=False, unique=True),
    sa.Column("created_at", sa.DateTime, nullable=False),  # UTC
    sa.Column("label", sa.SmallInteger, nullable=False),
    sa.Column("client", sa.String(16)),  # a digest of the sender's address, never the address itself
    sa.Column("status", sa.String(16), nullable=False, server_default=FEEDBACK_ACCEPTED),
    sa.Column("reason", sa.String(160)),  # why a correction waits for review
    sa.Column("harvested_at", sa.DateTime),
    sa.Column("data_version", sa.String(64)),
)


# what a challenger answered to the same requests, off the request path (`digits promote VERSION --shadow`)
shadow_answers = sa.Table(
    "shadow_answers",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(REQUEST_ID_LENGTH), nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),  # UTC
    sa.Column("model_version", sa.String(32), nullable=False, index=True),
    sa.Column("runtime", sa.String(16), nullable=False),
    sa.Column("digit", sa.SmallInteger, nullable=False),
    sa.Column("confidence", sa.Float, nullable=False),
    sa.Column("unsure", sa.Boolean, nullable=False),
    sa.Column("probabilities", sa.JSON, nullable=False),
    sa.UniqueConstraint("request_id", "model_version"),
)


class PredictionLogError(RuntimeError):
    """The log's database cannot be opened or migrated; the message names it and the reason."""


class FeedbackRefused(ValueError):
    """A correction that cannot be recorded; the message says why. ``status`` is the HTTP answer."""

    status = 422


class UnknownRequest(FeedbackRefused):
    status = 404


class AlreadyCorrected(FeedbackRefused):
    status = 409


@dataclass(frozen=True)
class FeedbackPolicy:
    """When a correction from the public waits for a person's review instead of counting at once."""

    # a label that contradicts an answer at least this confident (and not unsure) is more likely a
    # mistake or an attack than a correction
    quarantine_confidence: float = 0.95
    # corrections one sender may make in a day before the rest wait for review
    client_daily_cap: int = 100


def utc_now() -> datetime:
    """Now in UTC, without a zone (SQLite keeps none; every time in the log is UTC)."""
    return datetime.now(UTC).replace(tzinfo=None)


def safe_url(url: str) -> str:
    """A database URL fit to show: without its password."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return f"{url.split('://', 1)[0]}://... (not a database URL)"


def new_request_id() -> str:
    """A UUID version 7 (RFC 9562) in hex: its time comes first, so the log's unique index on it grows at
    one end instead of taking each new id at a random place, as random (version 4) ids would."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    value = value & ~(0xF << 76) | 0x7 << 76  # the version
    value = value & ~(0x3 << 62) | 0x2 << 62  # the variant
    return f"{value:032x}"


def client_digest(address: str | None) -> str | None:
    """Enough to count one sender's corrections, without keeping where they came from."""
    return hashlib.sha256(address.encode()).hexdigest()[:16] if address else None


# ---------------------------------------------------------------- opening and migrating


def connect(url: str) -> Engine:
    """An engine for the log's database, SQLite in WAL mode (its folder created) when the URL is SQLite."""
    engine_url = sa.make_url(url)
    if engine_url.get_backend_name() != "sqlite":
        return sa.create_engine(engine_url, pool_pre_ping=True, json_serializer=_json)
    if engine_url.database and engine_url.database != ":memory:":
        Path(engine_url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(engine_url, connect_args={"timeout": 30}, json_serializer=_json)

    @sa.event.listens_for(engine, "connect")
    def _wal(connection, _record) -> None:
        cursor = connection.cursor()
        # a new database only (an existing one keeps its pages): a logged answer is about 1 KB, and with
        # 16 KB pages SQLite writes a batch of them with a quarter less work than with its default 4 KB
        cursor.execute("PRAGMA page_size=16384")
        cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


def _json(value: Any) -> str:
    """JSON columns as orjson writes them: the ten probabilities of every answer, a good share of the writer's work."""
    return orjson.dumps(value).decode()


def alembic_config(connection: sa.Connection | None = None):
    """Alembic's configuration for the log's migrations, bound to ``connection`` when given."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """Only one process migrates at a time: a file lock beside a SQLite database (PostgreSQL locks in SQL)."""
    database = engine.url.database
    if engine.url.get_backend_name() == "sqlite" and database and database != ":memory:":
        from filelock import FileLock

        with FileLock(f"{database}.migrate.lock", timeout=120):
            yield
    else:
        yield


def migrate(engine: Engine) -> None:
    """Bring the database to the latest schema revision (nothing to do when it is there)."""
    from alembic import command

    with _migration_lock(engine), engine.begin() as connection:
        if connection.dialect.name == "postgresql":  # held to the end of this transaction, DDL included
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        command.upgrade(alembic_config(connection), "head")


def open_log(url: str) -> Engine:
    """Connect to the log's database and migrate it: ready to write and query (PredictionLogError if it cannot be)."""
    try:
        engine = connect(url)
        migrate(engine)
    except (sa.exc.SQLAlchemyError, OSError) as err:
        reason = getattr(err, "orig", None) or err
        raise PredictionLogError(
            f"the prediction log at {safe_url(url)} cannot be opened: {str(reason).strip()} (DIGITS_LOG_DB_URL sets the database)"
        ) from err
    return engine


# ---------------------------------------------------------------- entries


# what the log keeps of each answer, in this order, followed by its ten probabilities
ANSWER_FIELDS = ("model_name", "model_version", "run_id", "digit", "confidence", "unsure")


class Answered(NamedTuple):
    """A request's answered images, as the service hands them to the writer: rows are made off the request path."""

    request_ids: tuple[str, ...]
    route: str
    answers: tuple[tuple, ...]  # of each answer, its ANSWER_FIELDS and probabilities (kept)
    runtime: str
    images: np.ndarray  # (n, 28, 28), 0-255
    upload: bytes | None
    at: datetime  # UTC


class ShadowAnswered(NamedTuple):
    """What the challenger answered to requests the champion answered."""

    request_ids: tuple[str, ...]
    answers: tuple[tuple, ...]  # of each answer, its ANSWER_FIELDS and probabilities (kept)
    runtime: str
    at: datetime  # UTC


def kept(answer: dict[str, Any]) -> tuple:
    """The ANSWER_FIELDS of an answer, then its probabilities, in one flat tuple of numbers and strings.

    Answers wait in the queue for up to a second, long enough for the garbage collector to move them to
    its oldest generation and rescan them, with the service's whole heap, in full collections. It stops
    tracking a tuple of numbers and strings at its first look (a tuple holding another only at its
    second); a dict holding a list it tracks to the end. Values are taken as they are: the writer
    converts them, off the request path, and a batch it cannot write is counted as failed.
    """
    return (
        answer.get("model_name"),
        answer.get("model_version"),
        answer.get("run_id"),
        answer.get("digit"),
        answer.get("confidence"),
        answer.get("unsure"),
        *(answer.get("probabilities") or ()),
    )


def answered(
    request_ids: Sequence[str],
    route: str,
    answers: Sequence[dict[str, Any]],
    runtime: str,
    images: np.ndarray,
    upload: bytes | None = None,
    at: datetime | None = None,
) -> Answered:
    """A request's answers for the log; ``at`` (now by default) is when they were answered."""
    return Answered(tuple(request_ids), route, tuple(map(kept, answers)), runtime, images, upload, at or utc_now())


def shadow_answered(request_ids: Sequence[str], answers: Sequence[dict[str, Any]], runtime: str) -> ShadowAnswered:
    return ShadowAnswered(tuple(request_ids), tuple(map(kept, answers)), runtime, utc_now())


def prediction_columns(requests: Sequence[Answered]) -> dict[str, list[Any]]:
    """Several requests' rows of ``predictions``, column by column; each image as its 784 bytes.

    The images are converted together: per request, numpy's fixed cost would outweigh a single image's.
    """
    pixels = np.concatenate([np.asarray(request.images, dtype=np.float32).reshape(-1, 28, 28) for request in requests])
    np.rint(pixels, out=pixels)
    np.clip(pixels, 0, 255, out=pixels)
    return _answer_columns(requests, "model_name", "run_id") | {
        "route": _per_request(requests, lambda request: request.route),
        "runtime": _per_request(requests, lambda request: request.runtime),
        "upload": _per_request(requests, lambda request: request.upload),
        "image": [image.tobytes() for image in pixels.astype(np.uint8)],
    }


def shadow_columns(requests: Sequence[ShadowAnswered]) -> dict[str, list[Any]]:
    """Several requests' rows of ``shadow_answers``, column by column."""
    return _answer_columns(requests) | {"runtime": _per_request(requests, lambda request: request.runtime)}


def _answer_columns(requests: Sequence[Answered | ShadowAnswered], *other_fields: str) -> dict[str, list[Any]]:
    answers = list(chain.from_iterable(request.answers for request in requests))
    fields = dict(zip(ANSWER_FIELDS, zip(*answers, strict=True), strict=False))  # a column of each field
    return {
        "request_id": list(chain.from_iterable(request.request_ids for request in requests)),
        "created_at": _per_request(requests, lambda request: request.at),
        "model_version": list(map(str, fields["model_version"])),
        "digit": list(map(int, fields["digit"])),
        "confidence": list(map(float, fields["confidence"])),
        "unsure": list(map(bool, fields["unsure"])),
        "probabilities": [answer[len(ANSWER_FIELDS) :] for answer in answers],
    } | {name: list(fields[name]) for name in other_fields}


def _per_request(requests: Sequence[Answered | ShadowAnswered], value: Callable[[Any], Any]) -> list[Any]:
    return [value(request) for request in requests for _ in request.answers]


def insert_columns(connection: sa.Connection, table: sa.Table, columns: dict[str, list[Any]]) -> None:
    """Insert rows given column by column, many rows to a statement.

    SQLAlchemy's own insert runs a Python conversion per value of every row, and the drivers' executemany
    runs one statement per row (SQLite's lets go of the GIL for each, PostgreSQL's makes a round trip for
    each): at thousands of answers a second that was most of the writer's time. The two conversions this
    schema needs are done here, a column at a time: times as SQLAlchemy stores them in SQLite
    (PostgreSQL takes datetimes), JSON text.
    """
    sqlite = connection.dialect.name == "sqlite"
    names, values = [], []
    for name, column in columns.items():
        kind = table.c[name].type
        if isinstance(kind, sa.JSON):
            column = [_json(value) for value in column]
        elif isinstance(kind, sa.DateTime) and sqlite:
            # as SQLAlchemy writes a DateTime into SQLite (so that rows compare and read back alike); isoformat
            # is several times faster than strftime, and a request's answers share one time
            as_text = {moment: moment.isoformat(" ", "microseconds") for moment in set(column)}
            column = [as_text[moment] for moment in column]
        names.append(name)
        values.append(column)
    rows = list(zip(*values, strict=True))
    mark = "?" if connection.dialect.paramstyle == "qmark" else "%s"
    row_marks = f"({', '.join([mark] * len(names))})"
    # statements of a few sizes only, powers of two: a driver keeps each SQL text it saw prepared (Python's
    # sqlite3 up to 128 a connection), and one of hundreds of rows holds about a megabyte
    largest = 1 << (max(1, MAX_PARAMETERS // len(names)).bit_length() - 1)
    start = 0
    while start < len(rows):
        chunk = rows[start : start + min(largest, 1 << ((len(rows) - start).bit_length() - 1))]
        sql = f"INSERT INTO {table.name} ({', '.join(names)}) VALUES {', '.join([row_marks] * len(chunk))}"
        connection.exec_driver_sql(sql, tuple(chain.from_iterable(chunk)))
        start += len(chunk)


def image_of(row_image: bytes) -> np.ndarray:
    """A logged image back as a 28x28 uint8 array."""
    return np.frombuffer(row_image, dtype=np.uint8).reshape(28, 28)


class LogWriter:
    """Writes answers to the log in batches from a thread of its own; ``submit`` never blocks.

    A request's answers travel together, as :func:`answered` (or :func:`shadow_answered`) gives them.
    ``dropped`` counts answers refused because ``capacity`` answers were waiting already, ``failed`` those
    the database refused (logged as warnings), ``written`` the rest. ``cpu_seconds`` is the thread's own CPU
    time: what the log costs the service's cores, whatever else runs beside it.
    """

    def __init__(self, engine: Engine, capacity: int = 10_000, batch_size: int = 1000, linger: float = 1.0) -> None:
        self.engine = engine
        self.capacity = capacity
        self.batch_size = batch_size
        self.linger = linger
        self.written = 0
        self.dropped = 0
        self.failed = 0
        self.cpu_seconds = 0.0
        self._queue: queue.SimpleQueue[Answered | ShadowAnswered] = queue.SimpleQueue()
        self._accepted = 0  # answers queued; only submit changes it
        self._taken = 0  # answers taken off the queue; only the writer changes it
        self._handled = 0  # answers written or failed; only the writer changes it
        self._flushing = 0  # answers a flush waits for: the writer does not linger until it has taken them
        self._progress = threading.Condition()
        self._stopping = threading.Event()
        self._hurry = threading.Event()  # ends a linger early: a flush or close is waiting
        self._thread = threading.Thread(target=self._run, name="prediction-log-writer", daemon=True)

    def start(self) -> LogWriter:
        self._thread.start()
        return self

    def submit(self, request: Answered | ShadowAnswered) -> int:
        """Queue one request's answers (or the challenger's); how many were dropped (all or none)."""
        count = len(request.request_ids)
        if self._accepted - self._taken + count > self.capacity:
            self.dropped += count
            return count
        self._queue.put(request)
        self._accepted += count
        return 0

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every answer queued so far is written (or refused); False on timeout."""
        target = self._accepted
        with self._progress:
            self._flushing = max(self._flushing, target)
            self._hurry.set()
            return self._progress.wait_for(lambda: self._handled >= target, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, then stop the thread."""
        self._stopping.set()
        self._hurry.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def stats(self) -> dict[str, int | float]:
        # queued: accepted and not yet written or refused, so that at 0 ``written`` is final
        return {
            "written": self.written,
            "dropped": self.dropped,
            "failed": self.failed,
            "queued": self._accepted - self._handled,
            "cpu_seconds": round(self.cpu_seconds, 6),
        }

    def _take(self) -> list[Answered | ShadowAnswered]:
        """The next batch: what has arrived ``linger`` seconds after its first request, up to ``batch_size`` answers.

        Waiting matters: a transaction per request would cost far more than the rows it writes, and so
        would waking this thread for every request. Each write holds the GIL for a while and takes the core
        from requests, so few large writes touch fewer requests than many small ones. A full batch already
        waiting, a flush or a close ends the wait.
        """
        try:
            batch = [self._queue.get(timeout=0.2)]
        except queue.Empty:
            return []
        if self._accepted - self._taken < self.batch_size and self._flushing <= self._taken and not self._stopping.is_set():
            self._hurry.wait(self.linger)
        self._hurry.clear()  # before draining: what a later flush waits for is then still queued, or taken here
        count = len(batch[0].request_ids)
        while count < self.batch_size:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
            count += len(batch[-1].request_ids)
        self._taken += count
        return batch

    def _run(self) -> None:
        while not (self._stopping.is_set() and self._queue.empty()):
            started = time.thread_time()
            batch = self._take()
            count = self._write(batch) if batch else 0
            self.cpu_seconds += time.thread_time() - started  # counted before a flush waiting on this batch returns
            if count:
                with self._progress:
                    self._handled += count
                    self._progress.notify_all()

    def _write(self, batch: list[Answered | ShadowAnswered]) -> int:
        """Write a batch in one transaction, counting it as written or failed; how many answers it held."""
        count = sum(len(request.request_ids) for request in batch)
        try:
            with self.engine.begin() as connection:
                if answers := [request for request in batch if isinstance(request, Answered)]:
                    insert_columns(connection, predictions, prediction_columns(answers))
                if shadows := [request for request in batch if isinstance(request, ShadowAnswered)]:
                    insert_columns(connection, shadow_answers, shadow_columns(shadows))  # after the answers they follow
            self.written += count
        except Exception as err:  # the service must go on answering whatever the database does
            self.failed += count
            log.warning("the prediction log could not write %d answers: %s", count, err)
        return count


# ---------------------------------------------------------------- corrections


def check_label(value: Any) -> int:
    """A digit 0-9 (an integer, or a string of one); FeedbackRefused (422) saying what was sent otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise FeedbackRefused(f"label must be a digit 0-9; got {type(value).__name__} {value!r}")
    if isinstance(value, str):
        if not (value.strip().isdigit() and len(value.strip()) == 1):
            raise FeedbackRefused(f"label must be a digit 0-9; got {value!r}")
        value = int(value)
    if not 0 <= value <= 9:
        raise FeedbackRefused(f"label must be a digit 0-9; got {value}")
    return value


def check_request_id(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > REQUEST_ID_LENGTH:
        raise FeedbackRefused(f"request_id must be the request_id of an answer (1-{REQUEST_ID_LENGTH} characters); got {value!r}")
    return value


def record_feedback(
    engine: Engine, request_id: Any, label: Any, client: str | None = None, policy: FeedbackPolicy | None = None
) -> dict[str, Any]:
    """Record the true digit of an answered request, once; what was answered and whether it was right.

    UnknownRequest (404) when no answer has that id, AlreadyCorrected (409) when it has a label
    already (the first one stands), FeedbackRefused (422) for a label that is not 0-9. Labels from the
    public are untrusted: one that contradicts a confident answer, or one beyond its sender's daily
    cap, is recorded as quarantined and only counts once a person approves it.
    """
    request_id, label = check_request_id(request_id), check_label(label)
    policy = policy or FeedbackPolicy()
    answered = sa.select(predictions.c.digit, predictions.c.confidence, predictions.c.unsure, predictions.c.model_version).where(
        predictions.c.request_id == request_id
    )
    now = utc_now()
    try:
        with engine.begin() as connection:
            prediction = connection.execute(answered).first()
            if prediction is None:
                raise UnknownRequest(f"no answer has request_id {request_id!r} (it may be older than the log keeps)")
            reason = _quarantine_reason(connection, prediction, label, client, now, policy)
            connection.execute(
                sa.insert(feedback).values(
                    request_id=request_id,
                    created_at=now,
                    label=label,
                    client=client,
                    status=FEEDBACK_QUARANTINED if reason else FEEDBACK_ACCEPTED,
                    reason=reason,
                )
            )
    except sa.exc.IntegrityError:
        with engine.connect() as connection:
            first = connection.execute(sa.select(feedback.c.label).where(feedback.c.request_id == request_id)).scalar()
        raise AlreadyCorrected(f"request {request_id} was already corrected to {first}; the first correction stands") from None
    return {
        "request_id": request_id,
        "label": label,
        "digit": prediction.digit,
        "correct": prediction.digit == label,
        "model_version": prediction.model_version,
        "status": FEEDBACK_QUARANTINED if reason else FEEDBACK_ACCEPTED,
        **({"reason": reason} if reason else {}),
    }


def _quarantine_reason(
    connection: sa.Connection, prediction: sa.Row, label: int, client: str | None, now: datetime, policy: FeedbackPolicy
) -> str | None:
    if label != prediction.digit and not prediction.unsure and prediction.confidence >= policy.quarantine_confidence:
        return f"contradicts an answer given with {prediction.confidence:.1%} confidence"
    if client is not None:
        today = sa.select(sa.func.count()).where(feedback.c.client == client, feedback.c.created_at >= now - timedelta(days=1))
        if connection.execute(today).scalar() >= policy.client_daily_cap:
            return f"its sender already sent {policy.client_daily_cap} corrections in the last 24 hours"
    return None


def quarantined(engine: Engine, limit: int = 50) -> list[dict[str, Any]]:
    """Corrections waiting for review, oldest first, with the answer they correct and its image."""
    query = (
        sa.select(
            feedback.c.id,
            feedback.c.request_id,
            feedback.c.created_at,
            feedback.c.label,
            feedback.c.client,
            feedback.c.reason,
            predictions.c.digit,
            predictions.c.confidence,
            predictions.c.model_version,
            predictions.c.image,
        )
        .select_from(feedback.join(predictions))
        .where(feedback.c.status == FEEDBACK_QUARANTINED)
        .order_by(feedback.c.id)
        .limit(limit)
    )
    with engine.connect() as connection:
        return [row._asdict() for row in connection.execute(query)]


def review(engine: Engine, ids: Sequence[int] | None, approve: bool) -> int:
    """Accept (or reject) quarantined corrections by id, or all of them when ``ids`` is None; how many changed."""
    where = [feedback.c.status == FEEDBACK_QUARANTINED]
    if ids is not None:
        where.append(feedback.c.id.in_(list(ids)))
    status = FEEDBACK_ACCEPTED if approve else FEEDBACK_REJECTED
    with engine.begin() as connection:
        return connection.execute(sa.update(feedback).where(*where).values(status=status)).rowcount


def feedback_summary(engine: Engine) -> dict[str, Any]:
    """Corrections received: by label, by model version with its accuracy on them, and how many are ready to harvest."""
    with engine.connect() as connection:
        by_label = dict(connection.execute(sa.select(feedback.c.label, sa.func.count()).group_by(feedback.c.label)).all())
        answers = connection.execute(sa.select(sa.func.count()).select_from(predictions)).scalar()
        statuses = dict(connection.execute(sa.select(feedback.c.status, sa.func.count()).group_by(feedback.c.status)).all())
    return {
        "answers": answers,
        "feedback": sum(by_label.values()),
        "by_label": {str(label): by_label.get(label, 0) for label in range(10)},
        "by_version": accuracy_by_version(engine),
        "ready_to_harvest": ready_count(engine),
        "quarantined": statuses.get(FEEDBACK_QUARANTINED, 0),
        "rejected": statuses.get(FEEDBACK_REJECTED, 0),
    }


def accuracy_by_version(
    engine: Engine, since: datetime | None = None, until: datetime | None = None, accepted_only: bool = False
) -> dict[str, dict[str, float]]:
    """Corrections by the version that answered: how many, how many right, accuracy; in version order.

    ``since``/``until`` keep the answers given in that window (UTC); ``accepted_only`` leaves out held and
    rejected corrections, which are not trusted labels.
    """
    right = sa.func.sum(sa.case((predictions.c.digit == feedback.c.label, 1), else_=0))
    query = (
        sa.select(predictions.c.model_version, sa.func.count(), right)
        .select_from(feedback.join(predictions, feedback.c.request_id == predictions.c.request_id))
        .group_by(predictions.c.model_version)
    )
    if since is not None:
        query = query.where(predictions.c.created_at >= since)
    if until is not None:
        query = query.where(predictions.c.created_at < until)
    if accepted_only:
        query = query.where(feedback.c.status == FEEDBACK_ACCEPTED)
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    return {
        version: {"feedback": count, "correct": int(correct or 0), "accuracy": (correct or 0) / count}
        for version, count, correct in sorted(rows, key=lambda row: version_order(row[0]))
    }


def ready_count(engine: Engine) -> int:
    """Accepted corrections not harvested yet (the whole log): what the next harvest would add."""
    query = sa.select(sa.func.count()).where(feedback.c.harvested_at.is_(None), feedback.c.status == FEEDBACK_ACCEPTED)
    with engine.connect() as connection:
        return int(connection.execute(query).scalar())


def version_order(version: str) -> tuple[int, str]:
    """Sort key of model versions: numbers in order, anything else after them."""
    return (int(version), "") if version.isdigit() else (1 << 30, version)


# ---------------------------------------------------------------- the challenger in the shadows


def shadow_comparison(engine: Engine, challenger_version: str) -> dict[str, Any]:
    """The challenger against the model that really answered, on the requests it answered in the shadows.

    ``agreement`` is the share of those requests where both gave the same digit; the accuracies are
    on the ones people corrected or confirmed (accepted corrections only).
    """
    pairs = predictions.join(shadow_answers, shadow_answers.c.request_id == predictions.c.request_id)
    challenger = shadow_answers.c.model_version == challenger_version
    same = sa.func.sum(sa.case((shadow_answers.c.digit == predictions.c.digit, 1), else_=0))
    corrected = pairs.join(feedback, feedback.c.request_id == predictions.c.request_id)
    right = [
        sa.func.sum(sa.case((column == feedback.c.label, 1), else_=0)) for column in (predictions.c.digit, shadow_answers.c.digit)
    ]
    with engine.connect() as connection:
        count, agreed = connection.execute(sa.select(sa.func.count(), same).select_from(pairs).where(challenger)).one()
        labelled, served_right, challenger_right = connection.execute(
            sa.select(sa.func.count(), *right).select_from(corrected).where(challenger, feedback.c.status == FEEDBACK_ACCEPTED)
        ).one()
        served = connection.execute(
            sa.select(predictions.c.model_version).distinct().select_from(pairs).where(challenger)
        ).scalars()
        served_versions = sorted(served, key=version_order)
    return {
        "challenger_version": challenger_version,
        "versions_it_shadowed": served_versions,
        "requests": count,
        "agreement": (agreed or 0) / count if count else None,
        "feedback": labelled,
        "served_accuracy_on_feedback": (served_right or 0) / labelled if labelled else None,
        "challenger_accuracy_on_feedback": (challenger_right or 0) / labelled if labelled else None,
    }


# ---------------------------------------------------------------- harvest


def ready_to_harvest(engine: Engine) -> list[dict[str, Any]]:
    """Accepted corrections not harvested yet, oldest first: feedback id, label and the logged image."""
    query = (
        sa.select(feedback.c.id, feedback.c.label, predictions.c.image)
        .select_from(feedback.join(predictions))
        .where(feedback.c.status == FEEDBACK_ACCEPTED, feedback.c.harvested_at.is_(None))
        .order_by(feedback.c.id)
    )
    with engine.connect() as connection:
        return [row._asdict() for row in connection.execute(query)]


def mark_harvested(engine: Engine, ids: Sequence[int], data_version: str | None, reject_reason: str | None = None) -> None:
    """Record that these corrections went into ``data_version`` (or, with ``reject_reason``, never will)."""
    values: dict[str, Any] = {"harvested_at": utc_now(), "data_version": data_version}
    if reject_reason:
        values |= {"status": FEEDBACK_REJECTED, "reason": reject_reason}
    with engine.begin() as connection:
        for start in range(0, len(ids), 500):  # bounded IN lists
            connection.execute(sa.update(feedback).where(feedback.c.id.in_(list(ids[start : start + 500]))).values(**values))


# ---------------------------------------------------------------- retention


def prune(engine: Engine, days: float, now: datetime | None = None) -> int:
    """Delete answers older than ``days`` that nobody corrected (corrected ones are training data); how many went."""
    cutoff = (now or utc_now()) - timedelta(days=days)
    corrected = sa.select(feedback.c.request_id)
    with engine.begin() as connection:
        result = connection.execute(
            sa.delete(predictions).where(predictions.c.created_at < cutoff, predictions.c.request_id.not_in(corrected))
        )
    return result.rowcount


def answer_record(engine: Engine, request_id: str) -> dict[str, Any] | None:
    """One logged answer and its correction, if any (None for an unknown request id)."""
    query = (
        sa.select(
            predictions.c.request_id,
            predictions.c.created_at,
            predictions.c.route,
            predictions.c.model_name,
            predictions.c.model_version,
            predictions.c.run_id,
            predictions.c.runtime,
            predictions.c.digit,
            predictions.c.confidence,
            predictions.c.unsure,
            feedback.c.label,
            feedback.c.status.label("correction_status"),
        )
        .select_from(predictions.outerjoin(feedback, feedback.c.request_id == predictions.c.request_id))
        .where(predictions.c.request_id == check_request_id(request_id))
    )
    with engine.connect() as connection:
        row = connection.execute(query).first()
    return None if row is None else row._asdict() | {"created_at": row.created_at.isoformat()}
