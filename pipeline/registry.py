"""The MLflow tracking store and Model Registry: experiment set-up, champion lookup, promotion.

The ``champion`` alias names the served model; ``previous-champion`` keeps the one it replaced
reachable for rollback. Moving ``champion`` is a compare-and-set under a lock, so two retrains
that finish at once can never both promote.

The MLflow registry has no compare-and-set of its own, so the lock is what makes the check and
the move one step. When the store is PostgreSQL (``MLFLOW_TRACKING_URI`` names it, or
``DIGITS_PROMOTION_LOCK_URL`` names the tracking server's database) it is an advisory lock in that
database: every machine sharing the store takes the same one. Otherwise it is a file lock in the
project folder (``mlflow/promotion.lock``), which covers the processes of one machine.

A promotion's writes are not one transaction either: the intent is recorded first, and whatever
the process did not finish is finished by the next promotion, or by ``repair_promotion`` at the
start of a retrain.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.pause import pause_point
from pipeline.settings import Settings

if TYPE_CHECKING:
    import keras
    from mlflow import MlflowClient

    from pipeline.calibration import Calibration

log = logging.getLogger(__name__)

CHAMPION = "champion"
PREVIOUS = "previous-champion"
# a version the service also runs on live traffic, after answering, without its answers being served
CHALLENGER = "challenger"
# a registered-model tag: the promotion under way, written before its first alias write, removed after its last
INTENT_TAG = "promotion_in_progress"
# PostgreSQL advisory lock key of promotions (the prediction log's migrations use another)
PROMOTION_LOCK_KEY = 0x64696770
LOCK_WAIT_SECONDS = 120
# version tags written at promotion: the gate's verdict, and the sha256 of every file the service can load
VERDICT_TAG = "gate"
PROMOTE = "promote"
HASHES_TAG = "served_sha256"
# the params overrides of the run that trained the version (JSON), "{}" when it used params.yaml as it is
OVERRIDES_TAG = "overrides"
# the Keras model's files are recorded under this prefix, the run's serving exports under theirs ("serving/...")
KERAS_PREFIX = "model/"


class PromotionError(RuntimeError):
    """The champion could not be moved as asked; the message says why. Nothing was changed."""


class IntegrityError(RuntimeError):
    """A version that must not be served: the gate never passed it, or its files changed since. Says which, without paths."""


@dataclass(frozen=True)
class ModelRef:
    """A registered model version and what is known about it."""

    model_name: str
    version: str
    run_id: str | None
    metrics: dict[str, float]
    data_version: str | None
    git_commit: str | None
    promoted_at: str | None
    promoted_by: str | None
    promotion_reason: str | None
    reproduced: str | None = None  # the verdict of `digits reproduce`, with its date
    verdict: str | None = None  # "promote" once the gate (or `digits promote`'s checks) passed it
    overrides: dict[str, Any] | None = None  # the params overrides its run was trained and gated with
    # what the gate passed: served file -> sha256 (not shown: the service checks it)
    served_sha256: dict[str, str] | None = field(default=None, repr=False)

    @property
    def uri(self) -> str:
        return f"models:/{self.model_name}/{self.version}"

    def to_dict(self) -> dict:
        shown = asdict(self)
        shown.pop("served_sha256")
        return shown


def store_client(settings: Settings) -> MlflowClient:
    """Point MLflow at the configured store and return a client of it; creates nothing (the service only reads)."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(settings.resolved_tracking_uri)
    mlflow.set_registry_uri(settings.resolved_tracking_uri)
    if settings.tracking_uri is not None or not settings.mlflow_dir.is_dir():
        return MlflowClient(settings.resolved_tracking_uri, settings.resolved_tracking_uri)
    from filelock import FileLock

    # the first process to open the embedded store creates its tables; others doing it at once collide
    with FileLock(settings.mlflow_dir / "store.lock", timeout=600):
        client = MlflowClient(settings.resolved_tracking_uri, settings.resolved_tracking_uri)
        client.search_registered_models(max_results=1)  # the registry's tables, on first use
    return client


def connect(settings: Settings) -> MlflowClient:
    """A client of the configured store, with the experiment created if it is not there yet."""
    import mlflow

    if settings.artifact_location:
        settings.mlflow_dir.mkdir(parents=True, exist_ok=True)
    client = store_client(settings)
    if client.get_experiment_by_name(settings.experiment) is None:
        try:
            client.create_experiment(settings.experiment, artifact_location=settings.artifact_location)
        except Exception:  # a concurrent run created it first
            if client.get_experiment_by_name(settings.experiment) is None:
                raise
    mlflow.set_experiment(settings.experiment)
    return client


def _version_ref(client: MlflowClient, model_name: str, version) -> ModelRef:
    mv = version
    tags = dict(mv.tags or {})
    metrics: dict[str, float] = {}
    if mv.run_id:
        try:
            run_metrics = client.get_run(mv.run_id).data.metrics
            metrics = {k: v for k, v in run_metrics.items() if k in ("test_accuracy", "test_min_class_recall")}
        except Exception:  # the run may live in a store we cannot read; the version still stands
            pass
    return ModelRef(
        model_name=model_name,
        version=str(mv.version),
        run_id=mv.run_id,
        metrics=metrics,
        data_version=tags.get("data_version"),
        git_commit=tags.get("git_commit"),
        promoted_at=tags.get("promoted_at"),
        promoted_by=tags.get("promoted_by"),
        promotion_reason=tags.get("promotion_reason"),
        reproduced=tags.get("reproduced"),
        verdict=tags.get(VERDICT_TAG),
        overrides=_json_tag(tags, OVERRIDES_TAG),
        served_sha256=_json_tag(tags, HASHES_TAG),
    )


def _json_tag(tags: dict[str, str], key: str) -> dict | None:
    try:
        value = json.loads(tags[key])
    except (KeyError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def get_alias(client: MlflowClient, model_name: str, alias: str = CHAMPION) -> ModelRef | None:
    """The version an alias points to, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None
    return _version_ref(client, model_name, mv)


def alias_version(client: MlflowClient, model_name: str, alias: str = CHAMPION) -> str | None:
    """Only the version number an alias points to: one query, where ``get_alias`` also reads the version and its run."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None


def get_version(client: MlflowClient, model_name: str, version: str) -> ModelRef:
    from mlflow.exceptions import MlflowException

    try:
        return _version_ref(client, model_name, client.get_model_version(model_name, str(version)))
    except MlflowException:
        raise PromotionError(f"{model_name} has no version {version}: see `digits status --all`") from None


def list_versions(client: MlflowClient, model_name: str) -> list[ModelRef]:
    found = client.search_model_versions(f"name = '{model_name}'")
    return sorted((_version_ref(client, model_name, mv) for mv in found), key=lambda r: int(r.version))


def load_keras(uri: str) -> keras.Model:
    import mlflow.tensorflow

    import pipeline.augment  # noqa: F401  (registers the project's own layers with Keras)

    return mlflow.tensorflow.load_model(uri)


def load_tflite(run_id: str | None, file: str | None = None) -> bytes | None:
    """A TensorFlow Lite export a training run logged (``file``, the float32 one by default), or None.

    Versions trained before exports existed, or whose export did not answer like the Keras model,
    have none; they are served through Keras.
    """
    from pipeline.export import TFLITE_FILE

    return _serving_file(run_id, file or TFLITE_FILE)


def _serving_file(run_id: str | None, file: str) -> bytes | None:
    """The content of ``file`` among a run's serving artifacts, or None when the run has none such."""
    import tempfile
    from pathlib import Path

    import mlflow
    from mlflow import MlflowClient

    from pipeline.export import TFLITE_ARTIFACT_DIR

    path = f"{TFLITE_ARTIFACT_DIR}/{file}"
    if run_id is None or path not in {a.path for a in MlflowClient().list_artifacts(run_id, TFLITE_ARTIFACT_DIR)}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp)).read_bytes()


def load_calibration(run_id: str | None) -> Calibration | None:
    """The temperature and unsure threshold a training run fitted (``serving/calibration.json``), or None.

    Versions trained before calibration existed have none; the service then uses its default threshold.
    """
    from pipeline.calibration import Calibration
    from pipeline.export import CALIBRATION_FILE

    content = _serving_file(run_id, CALIBRATION_FILE)
    return None if content is None else Calibration.from_dict(json.loads(content))


def served_hashes(run_id: str | None, model_uri: str) -> dict[str, str]:
    """The sha256 of every file the service can load for a version: Keras model, TensorFlow Lite exports, calibration.

    Keys are artifact paths (``model/data/model.keras``, ``serving/model.tflite``); recorded at
    promotion, compared by the service with what it downloads before it loads anything.
    """
    import tempfile

    from pipeline.export import CALIBRATION_FILE, RUNTIME_FILES, TFLITE_ARTIFACT_DIR

    with tempfile.TemporaryDirectory() as tmp:
        hashes = _keras_hashes(_download_model(model_uri, Path(tmp)))
    for file in (*RUNTIME_FILES.values(), CALIBRATION_FILE):
        if (content := _serving_file(run_id, file)) is not None:
            hashes[f"{TFLITE_ARTIFACT_DIR}/{file}"] = _sha256(content)
    return hashes


def record_verdict(client: MlflowClient, model_name: str, version: str, hashes: dict[str, str]) -> None:
    """Mark a version as passed by the gate, with the hashes of the files it was passed with (the hashes first)."""
    client.set_model_version_tag(model_name, str(version), HASHES_TAG, json.dumps(hashes, sort_keys=True))
    client.set_model_version_tag(model_name, str(version), VERDICT_TAG, PROMOTE)


def check_served(expected: dict[str, str], key: str, content: bytes) -> None:
    """IntegrityError unless ``content`` is the file recorded as ``key`` when the version was promoted."""
    if key not in expected:
        raise IntegrityError(f"its {describe_served(key)} was not among the files the gate passed")
    if _sha256(content) != expected[key]:
        raise IntegrityError(f"its {describe_served(key)} differs from the one the gate passed")


def load_keras_checked(model_uri: str, expected: dict[str, str]) -> keras.Model:
    """The Keras model of a version, loaded from a download whose every file matches the recorded hashes."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        local = _download_model(model_uri, Path(tmp))
        recorded = {k: v for k, v in expected.items() if k.startswith(KERAS_PREFIX)}
        if _keras_hashes(local) != recorded:
            raise IntegrityError(f"its {describe_served(KERAS_PREFIX)} differs from the one the gate passed")
        return load_keras(str(local))


def describe_served(key: str) -> str:
    """A served file, named for people: what it is, not where it lies."""
    from pipeline.export import CALIBRATION_FILE, INT8_FILE, TFLITE_FILE

    names = {INT8_FILE: "int8 TensorFlow Lite export", TFLITE_FILE: "TensorFlow Lite export", CALIBRATION_FILE: "calibration"}
    return "Keras model" if key.startswith(KERAS_PREFIX) else names.get(key.rpartition("/")[2], "served file")


def _download_model(model_uri: str, dst: Path) -> Path:
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))


# written by MLflow's client into every download of a registered version (its name and number), not stored
_CLIENT_WRITTEN = {"registered_model_meta"}


def _keras_hashes(folder: Path) -> dict[str, str]:
    return {
        KERAS_PREFIX + path.relative_to(folder).as_posix(): _sha256(path.read_bytes())
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.relative_to(folder).as_posix() not in _CLIENT_WRITTEN
    }


def _sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def register(client: MlflowClient, model_name: str, model_uri: str, run_id: str, tags: dict[str, str]) -> ModelRef:
    """Register a logged model as a new version (no alias moves here)."""
    import mlflow

    mv = mlflow.register_model(model_uri, model_name, tags={k: str(v) for k, v in tags.items()})
    if mv.run_id is None or mv.run_id != run_id:
        client.set_model_version_tag(model_name, mv.version, "source_run_id", run_id)
    return get_version(client, model_name, mv.version)


def move_champion(
    client: MlflowClient,
    settings: Settings,
    version: str,
    expected_champion: str | None,
    reason: str,
    run_id: str | None = None,
) -> ModelRef:
    """Make ``version`` the champion if the champion is still ``expected_champion``.

    The check and the move happen under one lock (``promotion_lock``): a retrain that compared
    itself with a champion that has since moved must not overwrite it without being compared with
    the new one. The move is written as an intent first, then the ``champion`` alias, then the rest
    (version tags, ``previous-champion``, the history): a promotion killed part-way is finished by
    the next one, or by ``repair_promotion`` when a retrain starts.
    """
    name = settings.model_name
    with promotion_lock(settings):
        _finish_interrupted(client, name)
        current_version = alias_version(client, name, CHAMPION)
        pause_point("champion-read")
        if current_version != expected_champion:
            raise PromotionError(
                f"the champion moved during this run (expected {expected_champion or 'none'}, "
                f"now v{current_version}); it was not replaced. Retrain to compare with the new champion."
            )
        if current_version == str(version):
            raise PromotionError(f"v{version} is already the champion")
        intent = {
            "version": str(version),
            "from": current_version,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "by": settings.promoted_by or getpass.getuser(),
            "run_id": run_id,
            "reason": reason[:4000],
        }
        client.set_registered_model_tag(name, INTENT_TAG, json.dumps(intent))
        client.set_registered_model_alias(name, CHAMPION, str(version))
        pause_point("alias-writes")
        _complete(client, name, intent)
    log.info("champion: v%s (was %s)", version, f"v{current_version}" if current_version else "none")
    return get_version(client, name, str(version))


def _complete(client: MlflowClient, name: str, intent: dict) -> None:
    """Everything a promotion writes after the ``champion`` alias; each write can be done twice."""
    version, previous = intent["version"], intent["from"]
    for key, value in {
        "promoted_at": intent["at"],
        "promoted_by": intent["by"],
        "promotion_reason": intent["reason"],
        "promoted_from": previous or "none",
        **({"promotion_run_id": intent["run_id"]} if intent["run_id"] else {}),
    }.items():
        client.set_model_version_tag(name, version, key, value)
    if previous:
        client.set_registered_model_alias(name, PREVIOUS, previous)
    if alias_version(client, name, CHALLENGER) == version:  # the challenger won: its shadow run is over
        client.delete_registered_model_alias(name, CHALLENGER)
    entry = {"version": version, "from": previous, "at": intent["at"], "by": intent["by"], "run_id": intent["run_id"]}
    history = _history(client, name)
    if entry not in history[-1:]:
        history.append(entry)
        client.set_registered_model_tag(name, "promotion_history", json.dumps(history[-40:]))
    client.delete_registered_model_tag(name, INTENT_TAG)


def _finish_interrupted(client: MlflowClient, name: str) -> str | None:
    """Finish or drop a promotion whose process died after writing its intent; says what was done (None: nothing)."""
    from mlflow.exceptions import MlflowException

    try:
        raw = client.get_registered_model(name).tags.get(INTENT_TAG)
    except MlflowException:  # no model registered yet
        return None
    if not raw:
        return None
    intent = json.loads(raw)
    if alias_version(client, name, CHAMPION) == intent["version"]:
        _complete(client, name, intent)
        was = f"v{intent['from']}" if intent["from"] else "none"
        done = f"finished the interrupted promotion of v{intent['version']} (was {was})"
    else:  # the champion alias never moved (or was moved by hand since): nothing of it is left to undo
        client.delete_registered_model_tag(name, INTENT_TAG)
        done = f"dropped the interrupted promotion of v{intent['version']}: the champion never moved to it"
    log.warning("%s: %s", name, done)
    return done


def repair_promotion(client: MlflowClient, settings: Settings) -> str | None:
    """At start: finish a promotion killed between its writes (see ``move_champion``); says what was done, or None."""
    with promotion_lock(settings):
        return _finish_interrupted(client, settings.model_name)


@contextmanager
def promotion_lock(settings: Settings) -> Iterator[None]:
    """The lock every move of an alias takes: in PostgreSQL when the store is there, else a file in the project.

    A PostgreSQL advisory lock is held by the database connection, so it covers every machine that
    shares the store and is released when its process dies, even by ``kill -9``. The file lock
    covers the processes of one machine (the embedded SQLite store).
    """
    url = settings.promotion_lock_database
    if url is None:
        yield from _file_lock(settings)
    else:
        yield from _database_lock(url)


def _file_lock(settings: Settings) -> Iterator[None]:
    from filelock import FileLock, Timeout

    settings.promotion_lock.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(settings.promotion_lock)
    try:
        lock.acquire(timeout=LOCK_WAIT_SECONDS)
    except Timeout:
        raise PromotionError(f"another promotion holds {settings.promotion_lock}; try again") from None
    try:
        yield
    finally:
        lock.release()


def _database_lock(url: str) -> Iterator[None]:
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    from pipeline.prediction_log import safe_url

    if sa.make_url(url).get_backend_name() != "postgresql":
        raise PromotionError(
            f"the promotion lock needs PostgreSQL; DIGITS_PROMOTION_LOCK_URL is {safe_url(url)}. "
            "Point it at the tracking server's database, or unset it for the file lock of one machine."
        )
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        connection = engine.connect()
    except sa.exc.OperationalError as err:
        engine.dispose()
        raise PromotionError(f"cannot take the promotion lock in {safe_url(url)}: {str(err.orig).strip()}") from None
    try:
        with connection.begin():  # the lock is the transaction's: released at its end, or with the connection
            try:
                connection.execute(sa.text(f"SET LOCAL lock_timeout = '{LOCK_WAIT_SECONDS}s'"))
                connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": PROMOTION_LOCK_KEY})
            except sa.exc.OperationalError as err:
                if getattr(err.orig, "pgcode", None) == "55P03":  # lock_not_available: the wait timed out
                    raise PromotionError("another promotion holds the lock in the tracking database; try again") from None
                raise PromotionError(f"cannot take the promotion lock in {safe_url(url)}: {str(err.orig).strip()}") from None
            yield
    finally:
        connection.close()
        engine.dispose()


def set_challenger(client: MlflowClient, settings: Settings, version: str | None) -> ModelRef | None:
    """Point ``challenger`` at ``version`` (the service then runs it in the shadows), or remove it with None."""
    name = settings.model_name
    with promotion_lock(settings):  # the champion must not become this version meanwhile
        if version is None:
            if alias_version(client, name, CHALLENGER) is not None:
                client.delete_registered_model_alias(name, CHALLENGER)
            return None
        ref = get_version(client, name, version)
        if alias_version(client, name, CHAMPION) == ref.version:
            raise PromotionError(f"v{ref.version} is the champion: a challenger must be another version")
        client.set_registered_model_alias(name, CHALLENGER, ref.version)
        client.set_model_version_tag(name, ref.version, "shadow_since", datetime.now(UTC).isoformat(timespec="seconds"))
    log.info("challenger: v%s, run in the shadows of the champion", ref.version)
    return ref


def _history(client: MlflowClient, model_name: str) -> list[dict]:
    raw = client.get_registered_model(model_name).tags.get("promotion_history")
    return json.loads(raw) if raw else []


def promotion_history(client: MlflowClient, model_name: str) -> list[dict]:
    """Every promotion, oldest first: version, previous version, when, who, run."""
    from mlflow.exceptions import MlflowException

    try:
        return _history(client, model_name)
    except MlflowException:
        return []
