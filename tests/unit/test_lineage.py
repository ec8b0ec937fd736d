"""The parts of a data version a run logs as MLflow datasets (pure: no store, no DVC)."""

from __future__ import annotations

import numpy as np

from pipeline import lineage
from pipeline.data import Dataset

MD5 = "627efe430bc4b4ed0d31af56ca1fb5c6.dir"


def _images(n: int, value: int) -> np.ndarray:
    return np.full((n, 28, 28), value, np.uint8)


def _version(location: str = "/remote/files/md5/62/7efe430bc4b4ed0d31af56ca1fb5c6.dir") -> lineage.StoredVersion:
    files = {
        "mnist/train_images.npy": "a" * 32,
        "mnist/train_labels.npy": "b" * 32,
        "mnist/test_images.npy": "c" * 32,
        "added/images.npy": "d" * 32,
        "feedback/train_images.npy": "e" * 32,
        "feedback/test_images.npy": "f" * 32,
    }
    return lineage.StoredVersion(MD5, location, "remote", files)


def _dataset(feedback: bool) -> Dataset:
    # 10 MNIST training images followed by 3 added ones, as load_dataset joins them
    x_train = np.concatenate([_images(10, 1), _images(3, 2)])
    extra = (_images(4, 3), np.zeros(4, np.uint8), _images(2, 4), np.zeros(2, np.uint8)) if feedback else ()
    return Dataset(x_train, np.zeros(13, np.uint8), _images(5, 5), np.zeros(5, np.uint8), *extra)


def test_training_parts_split_mnist_from_the_added_images_and_feedback():
    parts = lineage.training_parts(_dataset(feedback=True), _version(), added=3)
    assert [(p.name, p.context, len(p.images)) for p in parts] == [
        ("mnist-train", "training", 10),
        ("added", "training", 3),
        ("feedback-train", "training", 4),
    ]
    assert all(p.digest == MD5 for p in parts)
    assert (parts[0].images == 1).all() and (parts[1].images == 2).all()
    assert parts[0].tags["dvc_files"] == f"mnist/train_images.npy={'a' * 12}, mnist/train_labels.npy={'b' * 12}"
    assert parts[2].tags["dvc_path"] == "data/feedback/train_*.npy"


def test_without_added_images_or_feedback_only_mnist_is_logged():
    assert [p.name for p in lineage.training_parts(_dataset(feedback=False), _version())] == ["mnist-train"]
    assert [p.name for p in lineage.evaluation_parts(_dataset(feedback=False), _version())] == ["mnist-test"]


def test_evaluation_parts_name_the_suite_by_its_own_digest():
    suite = {"rotated": (_images(2, 6), np.ones(2)), "thick": (_images(3, 7), np.ones(3))}
    parts = lineage.evaluation_parts(_dataset(feedback=True), _version(), suite, "9" * 32, {"images_per_family": "2"})
    assert [(p.name, p.context, len(p.images)) for p in parts] == [
        ("mnist-test", "evaluation", 5),
        ("ood-suite", "evaluation", 5),
        ("feedback-test", "evaluation", 2),
    ]
    ood = parts[1]
    assert ood.digest == "9" * 32 and ood.tags["families"] == "rotated, thick" and MD5 in ood.tags["rendered_from"]
    assert ood.tags["images_per_family"] == "2"


def test_the_source_type_follows_where_dvc_keeps_the_version():
    assert _version().source_type == "local"
    assert _version("file:///remote/x.dir").source_type == "local"
    assert _version("s3://bucket/dvc/files/md5/62/7e.dir").source_type == "s3"
    assert _version("ssh://host/dvc/files/md5/62/7e.dir").source_type == "ssh"
