"""Data lineage in MLflow: every data version a run trains or is evaluated on, as a dataset input of the run.

MLflow lists a run's dataset inputs on its page and compares runs by them; a tag alone it does not
show. Each part of the data version (MNIST's splits, images added by hand, the harvested feedback,
the out-of-distribution suite rendered from MNIST's test set) becomes one dataset: its digest is the
DVC hash of the data version (the suite's: a hash of what it is rendered from and by), its source
where DVC keeps that version (the default remote, else the local cache).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import numpy as np

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from pipeline.data import Dataset

log = logging.getLogger(__name__)

TRAINING = "training"
EVALUATION = "evaluation"
# MLflow keeps an input tag's value to this many characters
TAG_LIMIT = 500


@dataclass(frozen=True)
class StoredVersion:
    """Where DVC keeps a data version, and the md5 of each file in it (from its ``.dir`` manifest)."""

    md5: str
    location: str  # a path or URL
    stored_in: str  # "remote" (dvc push reached it), "cache" (only this machine has it) or "unknown"
    files: dict[str, str] = field(default_factory=dict)  # relative path under data/ -> md5

    @property
    def source_type(self) -> str:
        """What MLflow calls such a location: ``local`` for a path, else the URL's scheme (s3, gs, ssh ...)."""
        scheme = urlparse(self.location).scheme
        return "local" if not scheme or scheme == "file" or len(scheme) == 1 else scheme


@dataclass(frozen=True)
class DataPart:
    """One dataset input of a run: a part of a data version, used for training or for evaluation."""

    name: str
    context: str  # TRAINING or EVALUATION
    images: np.ndarray  # uint8 (n, 28, 28): only their shape and type go to MLflow (its schema and profile)
    labels: np.ndarray
    digest: str
    tags: dict[str, str] = field(default_factory=dict)


def stored_version(root: Path, md5: str) -> StoredVersion:
    """Ask DVC where ``md5`` lives: in the default remote when it holds the version, else in the local cache."""
    try:
        from dvc.repo import Repo

        repo = Repo(str(root))
    except Exception as err:  # not a DVC project: the version can still be named, not located
        log.info("no DVC repository at %s (%s): data versions are logged without a location", root, err)
        return StoredVersion(md5, str(root / "data"), "unknown")
    try:
        files = _manifest(repo.cache.local.oid_to_path(md5))
        try:
            remote = repo.cloud.get_remote_odb()
            path = remote.oid_to_path(md5)
            if remote.fs.exists(path):  # a failed `dvc push` left it in the cache only
                return StoredVersion(md5, remote.fs.unstrip_protocol(path), "remote", files)
        except Exception as err:  # no default remote, or it cannot be reached: the cache is what is known
            log.info("data version %s: no DVC remote holding it could be checked (%s)", md5, err)
        return StoredVersion(md5, repo.cache.local.oid_to_path(md5), "cache", files)
    finally:
        repo.close()


def _manifest(path: str) -> dict[str, str]:
    """A ``.dir`` object's entries (relative path -> md5); empty when the cache does not hold it."""
    try:
        return {entry["relpath"]: entry["md5"] for entry in json.loads(Path(path).read_text())}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _files_tag(version: StoredVersion, prefix: str) -> dict[str, str]:
    """The md5 of each file of a part, so that runs can be compared part by part."""
    files = {path: md5 for path, md5 in sorted(version.files.items()) if path.startswith(prefix)}
    text = ", ".join(f"{path}={md5[:12]}" for path, md5 in files.items())
    return {"dvc_files": text[:TAG_LIMIT]} if text else {}


def training_parts(dataset: Dataset, version: StoredVersion, added: int = 0) -> list[DataPart]:
    """MNIST's training split, the images added by hand (the last ``added`` of ``x_train``) and feedback-train."""
    mnist = len(dataset.x_train) - added
    parts = [
        DataPart(
            "mnist-train",
            TRAINING,
            dataset.x_train[:mnist],
            dataset.y_train[:mnist],
            version.md5,
            {"dvc_path": "data/mnist/train_*.npy", **_files_tag(version, "mnist/train_")},
        )
    ]
    if added:
        parts.append(
            DataPart(
                "added",
                TRAINING,
                dataset.x_train[mnist:],
                dataset.y_train[mnist:],
                version.md5,
                {"dvc_path": "data/added/*.npy", **_files_tag(version, "added/")},
            )
        )
    if len(dataset.x_feedback_train):
        parts.append(
            DataPart(
                "feedback-train",
                TRAINING,
                dataset.x_feedback_train,
                dataset.y_feedback_train,
                version.md5,
                {"dvc_path": "data/feedback/train_*.npy", **_files_tag(version, "feedback/train_")},
            )
        )
    return parts


def evaluation_parts(
    dataset: Dataset,
    version: StoredVersion,
    suite: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    suite_digest: str | None = None,
    suite_tags: dict[str, str] | None = None,
) -> list[DataPart]:
    """MNIST's test split, the out-of-distribution suite (its families' normalised pixels and labels) and feedback-test."""
    parts = [
        DataPart(
            "mnist-test",
            EVALUATION,
            dataset.x_test,
            dataset.y_test,
            version.md5,
            {"dvc_path": "data/mnist/test_*.npy", **_files_tag(version, "mnist/test_")},
        )
    ]
    if suite:
        parts.append(
            DataPart(
                "ood-suite",
                EVALUATION,
                np.concatenate([pixels for pixels, _ in suite.values()]),
                np.concatenate([labels for _, labels in suite.values()]),
                suite_digest or version.md5,
                {
                    "rendered_from": f"mnist-test of data version {version.md5}",
                    "families": ", ".join(suite),
                    **(suite_tags or {}),
                },
            )
        )
    if len(dataset.x_feedback_test):
        parts.append(
            DataPart(
                "feedback-test",
                EVALUATION,
                dataset.x_feedback_test,
                dataset.y_feedback_test,
                version.md5,
                {"dvc_path": "data/feedback/test_*.npy", **_files_tag(version, "feedback/test_")},
            )
        )
    return parts


def log_parts(client: MlflowClient, run_id: str, parts: list[DataPart], version: StoredVersion) -> None:
    """The parts as the run's dataset inputs, in one call: name, DVC digest, location, schema, profile, context."""
    import mlflow.data
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.entities import Dataset as DatasetEntity
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = []
    for part in parts:
        # from_numpy gives the schema and profile (shapes, sizes); the source is set below, as DVC names it
        described = mlflow.data.from_numpy(
            part.images, source=CodeDatasetSource({}), targets=part.labels, name=part.name, digest=part.digest
        )
        entity = described._to_mlflow_entity()
        dataset = DatasetEntity(
            name=part.name,
            digest=part.digest,
            source_type=version.source_type,
            source=json.dumps({"uri": version.location}),
            schema=entity.schema,
            profile=entity.profile,
        )
        tags = {MLFLOW_DATASET_CONTEXT: part.context, "dvc_stored_in": version.stored_in, **part.tags}
        inputs.append(DatasetInput(dataset, [InputTag(key, str(value)[:TAG_LIMIT]) for key, value in tags.items()]))
    client.log_inputs(run_id, datasets=inputs)
