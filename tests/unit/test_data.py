"""Data sources and added images: checksums, formats, and errors that name the problem."""

from __future__ import annotations

import gzip
import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import data as data_module
from pipeline.data import (
    DataError,
    _download,
    add_images,
    load_dataset,
    read_idx,
    read_keras_url,
    read_labelled_folder,
    read_local,
)
from pipeline.params import KerasUrlSource
from pipeline.preprocess import MAX_BYTES


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _digit_png(value: int = 255, size: int = 40) -> bytes:
    image = np.zeros((size, size), np.uint8)
    image[8:32, 16:24] = value  # a vertical bar: a plausible "1"
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_checksum_mismatch_refuses_the_download_and_keeps_nothing(tmp_path):
    source = tmp_path / "mnist.npz"
    np.savez(source, x_train=np.zeros((1, 28, 28), np.uint8), y_train=[0], x_test=np.zeros((1, 28, 28), np.uint8), y_test=[0])
    with pytest.raises(DataError, match="checksum mismatch"):
        _download(source.as_uri(), tmp_path / "cache" / "mnist.npz", "0" * 64)
    assert not any((tmp_path / "cache").iterdir())


def test_keras_url_source_reads_a_verified_npz(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    source = tmp_path / "mnist.npz"
    np.savez(source, x_train=x, y_train=np.arange(5), x_test=x[:2], y_test=np.arange(2))
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    x_train, y_train, x_test, _ = read_keras_url(KerasUrlSource(url=source.as_uri(), sha256=digest), tmp_path / "cache")
    assert np.array_equal(x_train, x) and list(y_train) == [0, 1, 2, 3, 4] and x_test.shape == (2, 28, 28)


def test_idx_files_read_plain_and_gzipped(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.uint32).reshape(2, 28, 28) % 256
    for name, array in {
        "train-images-idx3-ubyte": images,
        "train-labels-idx1-ubyte": np.array([3, 4]),
        "t10k-images-idx3-ubyte": images[:1],
        "t10k-labels-idx1-ubyte": np.array([5]),
    }.items():
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress(_idx(array)))
    x_train, y_train, x_test, y_test = read_local(tmp_path)
    assert np.array_equal(x_train, images.astype(np.uint8)) and list(y_train) == [3, 4] and list(y_test) == [5]


def test_truncated_idx_file_is_named(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(_idx(np.zeros((2, 28, 28)))[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


def test_added_folder_with_bad_files_adds_nothing_and_lists_every_problem(tmp_path):
    folder = tmp_path / "new"
    (folder / "1").mkdir(parents=True)
    (folder / "12").mkdir()
    (folder / "1" / "good.png").write_bytes(_digit_png())
    (folder / "1" / "broken.png").write_bytes(_digit_png()[:60])
    (folder / "12" / "x.png").write_bytes(_digit_png())
    with pytest.raises(DataError) as raised:
        read_labelled_folder(folder)
    message = str(raised.value)
    assert "2 problem(s)" in message and "1/broken.png" in message and "12/: label outside 0-9" in message


def test_added_images_join_the_training_split(tmp_path):
    data = tmp_path / "data"
    (data / "mnist").mkdir(parents=True)
    for split, n in (("train", 4), ("test", 2)):
        np.save(data / "mnist" / f"{split}_images.npy", np.zeros((n, 28, 28), np.uint8))
        np.save(data / "mnist" / f"{split}_labels.npy", np.zeros(n, np.uint8))
    folder = tmp_path / "new"
    (folder / "7").mkdir(parents=True)
    (folder / "7" / "a.png").write_bytes(_digit_png())
    (folder / "7" / "b.png").write_bytes(_digit_png(value=200))
    assert add_images(folder, data) == 2
    dataset = load_dataset(data)
    assert dataset.x_train.shape == (6, 28, 28) and list(dataset.y_train[-2:]) == [7, 7]
    assert dataset.x_train[-1].max() > 0  # the digit survived normalisation


def _dataset(tmp_path):
    data = tmp_path / "data"
    (data / "mnist").mkdir(parents=True)
    for split, n in (("train", 4), ("test", 2)):
        np.save(data / "mnist" / f"{split}_images.npy", np.zeros((n, 28, 28), np.uint8))
        np.save(data / "mnist" / f"{split}_labels.npy", np.zeros(n, np.uint8))
    return data


def _labelled(folder, digit: int, count: int):
    (folder / str(digit)).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        (folder / str(digit) / f"{index}.png").write_bytes(_digit_png(value=200 + index))
    return folder


def test_added_images_and_labels_are_written_together(tmp_path, monkeypatch):
    """A write that stops part-way (here: the second file rename fails) leaves the images and labels of one version."""
    data = _dataset(tmp_path)
    add_images(_labelled(tmp_path / "first", 7, 2), data)
    real_replace, calls = data_module.os.replace, []

    def replace_then_die(source, target):
        calls.append(target)
        if len(calls) == 2:
            raise OSError("killed")
        real_replace(source, target)

    monkeypatch.setattr(data_module.os, "replace", replace_then_die)
    try:
        add_images(_labelled(tmp_path / "second", 3, 2), data)
    except OSError:
        pass
    dataset = load_dataset(data)  # images and labels of the same add, whichever it is
    assert len(dataset.x_train) == len(dataset.y_train) in (6, 8)


def test_a_link_out_of_the_added_folder_is_not_followed(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.png").write_bytes(_digit_png())
    folder = _labelled(tmp_path / "new", 7, 1)
    (folder / "7" / "link.png").symlink_to(outside / "secret.png")
    (folder / "3").symlink_to(outside, target_is_directory=True)
    (folder / "7" / "inside.png").symlink_to(folder / "7" / "0.png")  # a link within the folder is fine
    with pytest.raises(DataError) as raised:
        read_labelled_folder(folder)
    message = str(raised.value)
    assert "2 problem(s)" in message and "nothing was added" in message
    assert "7/link.png: a link to outside the folder" in message and "3/: a link to outside the folder" in message


def test_an_oversized_file_is_refused_before_it_is_read(tmp_path, monkeypatch):
    folder = _labelled(tmp_path / "new", 7, 1)
    with open(folder / "7" / "huge.png", "wb") as huge:
        huge.truncate(MAX_BYTES + 1)  # sparse: large on paper, nothing to write
    opened = []
    real_open = data_module.os.open
    monkeypatch.setattr(data_module.os, "open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    monkeypatch.setattr(Path, "read_bytes", lambda self: opened.append(str(self)) or b"")
    with pytest.raises(DataError) as raised:
        read_labelled_folder(folder)
    assert f"7/huge.png: {MAX_BYTES + 1:,} bytes; the limit is {MAX_BYTES:,}" in str(raised.value)
    assert not any(path.endswith("huge.png") for path in opened)


def test_a_folder_with_too_many_files_is_refused_without_reading_them_all(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "MAX_ADD_FILES", 3, raising=False)
    folder = _labelled(tmp_path / "new", 7, 5)
    with pytest.raises(DataError, match="more than 3 files"):
        read_labelled_folder(folder)


def test_corrupt_dataset_file_says_how_to_restore(tmp_path):
    data = tmp_path / "data"
    (data / "mnist").mkdir(parents=True)
    for split in ("train", "test"):
        for kind in ("images", "labels"):
            (data / "mnist" / f"{split}_{kind}.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match="dvc checkout"):
        load_dataset(data)
