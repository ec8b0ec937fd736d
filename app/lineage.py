"""Lineage use cases: log the data versions a run trains and is evaluated on as its MLflow dataset inputs.

The run's ``data_version`` tag (set when it opens) names the DVC version; ``pipeline.lineage`` locates
it and describes its parts. Both calls are bookkeeping: they never stop training or the gate.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from pipeline import lineage, registry
from pipeline.settings import Settings

if TYPE_CHECKING:
    from app.evaluation import SuiteImages
    from pipeline.data import Dataset

log = logging.getLogger(__name__)


def _stored_version(settings: Settings, run_id: str) -> lineage.StoredVersion | None:
    md5 = registry.connect(settings).get_run(run_id).data.tags.get("data_version")
    if not md5:
        log.info("run %s names no data version: no dataset inputs logged", run_id)
        return None
    return lineage.stored_version(settings.home, md5)


def _added_images(settings: Settings) -> int:
    """How many of the training images were added with ``digits data add`` (they follow MNIST's)."""
    labels = settings.data_dir / "added" / "labels.npy"
    return len(np.load(labels, mmap_mode="r")) if labels.exists() else 0


def log_training_data(settings: Settings, run_id: str, dataset: Dataset) -> None:
    """MNIST's training split, added images and feedback-train, as the run's inputs in context ``training``."""
    try:
        version = _stored_version(settings, run_id)
        if version is not None:
            parts = lineage.training_parts(dataset, version, _added_images(settings))
            lineage.log_parts(registry.connect(settings), run_id, parts, version)
    except Exception as err:  # the inputs describe the run; they must not stop it
        log.warning("could not log the training data of run %s as MLflow datasets: %s: %s", run_id, type(err).__name__, err)


def log_evaluation_data(
    settings: Settings, run_id: str, dataset: Dataset, suite: dict[str, SuiteImages], suite_digest: str, suite_size: int
) -> None:
    """MNIST's test split, the out-of-distribution suite and feedback-test, as the run's inputs in context ``evaluation``."""
    version = _stored_version(settings, run_id)
    if version is None:
        return
    families = {name: (images.pixels, images.labels) for name, images in suite.items()}
    tags = {"rendered_by": "pipeline/suite.py", "images_per_family": str(suite_size)}
    parts = lineage.evaluation_parts(dataset, version, families, suite_digest, tags)
    lineage.log_parts(registry.connect(settings), run_id, parts, version)
