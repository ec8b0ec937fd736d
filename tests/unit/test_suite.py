"""The out-of-distribution suite: every family decodes, is balanced, deterministic, and changes the digit as it says."""

from __future__ import annotations

import hashlib
import inspect
import io

import numpy as np
import pytest
from PIL import Image

from pipeline import suite
from pipeline.preprocess import ImageError, image_bytes_to_mnist, to_mnist

SIZE = 20
ALL_NAMES = (suite.CONTROL_NAME, *suite.FAMILY_NAMES)
MAGIC = {"PNG": b"\x89PNG\r\n\x1a\n", "JPEG": b"\xff\xd8\xff"}
# sha256 (first 16 hex digits) of each family built from the test slice with SIZE and seed 0: the same on every machine
EXPECTED_DIGESTS = {
    "clean": "fb6ec317ecbe6a84",
    "shifted": "fd1e62b537be1242",
    "rotated": "36c16815c220bfb2",
    "scaled": "ee250b8d9d0835cd",
    "sheared": "8e85f8bfe2742e75",
    "thin": "3c7e1464532d39f7",
    "thick": "30707341d058ea8b",
    "blurred": "da5162fbcdbcd939",
    "noisy": "4a4d112480c9e16d",
    "low_contrast": "dad84b798bf66c5c",
    "inverted": "74a27a8a23177872",
    "jpeg": "4a1e937ef369721f",
    "elastic": "ce743c1fe19be056",
    "photographed": "5b6aaec64bd6e2c9",
}


@pytest.fixture(scope="module")
def test_split(mnist_slice):
    return mnist_slice.x_test, mnist_slice.y_test


@pytest.fixture(scope="module")
def families(test_split) -> dict[str, suite.Family]:
    return suite.build_suite(*test_split, size=SIZE, names=ALL_NAMES)


def _gray(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float32)


def _digest(family: suite.Family) -> str:
    digest = hashlib.sha256()
    for data in family.images:
        digest.update(len(data).to_bytes(4, "big") + data)
    return digest.hexdigest()


def _clean_digits(family: suite.Family, test_split) -> np.ndarray:
    return test_split[0][family.source_indices].astype(np.float32)


def test_the_suite_has_at_least_twelve_families_each_described():
    assert len(suite.FAMILY_NAMES) >= 12
    assert suite.CONTROL_NAME not in suite.FAMILY_NAMES
    assert set(suite.DESCRIPTIONS) == set(ALL_NAMES)
    assert all(description.strip().endswith(".") for description in suite.DESCRIPTIONS.values())
    table = suite.families_markdown()
    assert all(f"`{name}`" in table for name in ALL_NAMES)


def test_the_builder_sees_only_the_test_split():
    assert list(inspect.signature(suite.build_family).parameters)[:3] == ["name", "x_test", "y_test"]
    assert list(inspect.signature(suite.build_suite).parameters)[:2] == ["x_test", "y_test"]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_family_decodes_with_its_count_labels_and_format(families, test_split, name):
    family = families[name]
    x_test, y_test = test_split
    assert family.name == name and family.description == suite.DESCRIPTIONS[name]
    assert len(family) == SIZE == len(family.labels) == len(family.source_indices)
    assert family.labels.dtype == np.int64
    assert np.array_equal(family.labels, y_test[family.source_indices])
    assert family.source_indices.min() >= 0 and family.source_indices.max() < len(x_test)
    assert len(set(family.source_indices.tolist())) == SIZE
    for data in family.images:
        assert data.startswith(MAGIC[family.image_format])
        assert _gray(data).size > 0


def test_the_sample_is_balanced_across_labels_and_shared_by_the_families(families, test_split):
    counts = np.bincount(families["rotated"].labels, minlength=10)
    assert counts.min() == counts.max() == SIZE // 10
    assert all(np.array_equal(family.source_indices, families["clean"].source_indices) for family in families.values())
    # a label with too few images gives its share to the others
    labels = np.array([0] * 3 + [1] * 50 + [2] * 50)
    picked = suite.balanced_sample(labels, 30)
    assert np.bincount(labels[picked]).tolist() == [3, 14, 13] or np.bincount(labels[picked]).tolist() == [3, 13, 14]
    with pytest.raises(ValueError, match="between 1 and"):
        suite.balanced_sample(test_split[1], len(test_split[1]) + 1)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_a_build_is_deterministic_and_a_seed_changes_it(test_split, families, name):
    again = suite.build_family(name, *test_split, size=SIZE)
    assert _digest(again) == _digest(families[name])
    assert np.array_equal(again.labels, families[name].labels)
    other = suite.build_family(name, *test_split, size=SIZE, seed=1)
    assert _digest(other) != _digest(families[name])


def test_a_build_gives_the_same_bytes_as_on_the_machine_that_wrote_this_test(families):
    digests = {name: _digest(family)[:16] for name, family in families.items()}
    changed = sorted(name for name in ALL_NAMES if digests[name] != EXPECTED_DIGESTS[name])
    assert not changed, (
        f"the suite's bytes changed for {changed}: a renderer changed, or a numpy, Pillow or scipy upgrade changed "
        "their arithmetic, so suite figures are no longer comparable with earlier runs. If that is intended, "
        f"update EXPECTED_DIGESTS to {digests}"
    )


def test_an_image_depends_on_its_test_index_not_on_the_family_size(test_split, families):
    larger = suite.build_family("photographed", *test_split, size=2 * SIZE)
    by_index = dict(zip(larger.source_indices.tolist(), larger.images, strict=True))
    shared = [i for i in families["photographed"].source_indices.tolist() if i in by_index]
    assert shared
    own = dict(zip(families["photographed"].source_indices.tolist(), families["photographed"].images, strict=True))
    assert all(by_index[i] == own[i] for i in shared)


def test_the_clean_control_is_the_test_digit_itself(families, test_split):
    decoded = np.stack([_gray(data) for data in families["clean"].images])
    assert np.array_equal(decoded, _clean_digits(families["clean"], test_split))


def test_shifted_digits_sit_off_centre_in_a_larger_canvas(families, test_split):
    for data in families["shifted"].images:
        image = _gray(data)
        assert image.shape[0] > 28
        rows, cols = np.nonzero(image > 64)
        centre = (image.shape[0] - 1) / 2
        assert max(abs(rows.mean() - centre), abs(cols.mean() - centre)) > image.shape[0] / 8


def test_rotated_sheared_and_elastic_digits_change_shape_but_keep_their_ink(families, test_split):
    clean = [to_mnist(digit).astype(np.float32) for digit in _clean_digits(families["clean"], test_split)]
    for name in ("rotated", "sheared", "elastic"):
        normalised = [image_bytes_to_mnist(data).astype(np.float32) for data in families[name].images]
        differences = [np.abs(a - b).mean() for a, b in zip(normalised, clean, strict=True)]
        assert np.median(differences) > 8, name
        assert all(image.max() > 200 for image in normalised), name


def test_scaled_digits_are_tiny_or_fill_the_frame(families):
    for data in families["scaled"].images:
        image = _gray(data)
        rows, cols = np.nonzero(image > 64)
        ink_height = rows.max() - rows.min() + 1
        assert ink_height <= 16 or ink_height >= 0.8 * image.shape[0]


def test_thin_and_thick_strokes_have_less_and_more_ink(families, test_split):
    clean = _clean_digits(families["clean"], test_split).sum(axis=(1, 2))
    thin = np.array([_gray(data).sum() for data in families["thin"].images])
    thick = np.array([_gray(data).sum() for data in families["thick"].images])
    assert np.all(thin < 0.9 * clean) and np.all(thin > 0.1 * clean)
    assert np.all(thick > 1.2 * clean)


def test_blurred_digits_have_soft_edges(families, test_split):
    def grey_share(image: np.ndarray) -> float:
        ink = image > 20
        return float(((image > 20) & (image < 200)).sum() / ink.sum())

    clean = [grey_share(digit) for digit in _clean_digits(families["clean"], test_split)]
    blurred = [grey_share(_gray(data)) for data in families["blurred"].images]
    assert np.median(blurred) > np.median(clean) + 0.2


def test_noisy_digits_have_noise_on_the_background(families, test_split):
    for data, digit in zip(families["noisy"].images, _clean_digits(families["noisy"], test_split), strict=True):
        background = _gray(data)[digit == 0]
        assert (background > 0).mean() > 0.015  # at least half the specks of 4 % are salt, visible on black


def test_low_contrast_digits_are_grey_on_grey(families):
    for data in families["low_contrast"].images:
        image = _gray(data)
        assert 25 <= image.max() - image.min() <= 61
        assert image.min() >= 30


def test_inverted_digits_are_dark_ink_on_a_light_border(families, test_split):
    for data, digit in zip(families["inverted"].images, _clean_digits(families["inverted"], test_split), strict=True):
        image = _gray(data)
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert np.median(border) > 200
        assert np.array_equal(image, 255 - digit)


def test_jpeg_digits_carry_compression_artefacts(families, test_split):
    clean = _clean_digits(families["jpeg"], test_split)
    errors = [np.abs(_gray(data) - digit).mean() for data, digit in zip(families["jpeg"].images, clean, strict=True)]
    assert min(errors) > 2


def test_photographs_are_rgb_jpegs_of_dark_ink_on_light_paper(families):
    sizes = set()
    for data in families["photographed"].images:
        image = Image.open(io.BytesIO(data))
        assert image.format == "JPEG" and image.mode == "RGB"
        assert 150 <= image.width <= 400 and 150 <= image.height <= 400
        sizes.add(image.size)
        gray = np.asarray(image.convert("L"), dtype=np.float32)
        paper, ink = np.median(gray), np.percentile(gray, 0.5)
        assert paper > 120, "the paper is light"
        assert ink < paper - 50, "the ink is dark"
    assert len(sizes) > SIZE // 2, "the photographs vary in size"


def test_photographs_vary_in_ink_colour(families):
    blue_ink = 0
    for data in families["photographed"].images:
        rgb = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32)
        darkest = rgb[rgb.sum(axis=2) <= np.percentile(rgb.sum(axis=2), 0.5)]
        blue_ink += int(darkest[:, 2].mean() > darkest[:, 0].mean() + 30)
    assert 0 < blue_ink < SIZE


def test_to_pixels_normalises_every_image_and_marks_the_refused(families):
    family = families["inverted"]
    done = []
    normalised = suite.to_pixels(family, progress=lambda i, n: done.append((i, n)))
    assert normalised.pixels.shape == (SIZE, 28, 28) and normalised.pixels.dtype == np.uint8
    assert not normalised.refused.any()
    assert done[-1] == (SIZE, SIZE)

    def refuse_the_first(data: bytes) -> np.ndarray:
        if data == family.images[0]:
            raise ImageError("not a digit")
        return image_bytes_to_mnist(data)

    partly = suite.to_pixels(family, normalise=refuse_the_first)
    assert partly.refused.tolist() == [True] + [False] * (SIZE - 1)
    assert not partly.pixels[0].any()
    assert np.array_equal(partly.pixels[1:], normalised.pixels[1:])


def test_bad_arguments_are_refused_with_a_reason(test_split):
    x_test, y_test = test_split
    with pytest.raises(ValueError, match="unknown family"):
        suite.build_family("sepia", x_test, y_test, size=2)
    with pytest.raises(ValueError, match="uint8"):
        suite.build_family("rotated", x_test.astype(np.float32), y_test, size=2)
    with pytest.raises(ValueError, match="labels"):
        suite.build_family("rotated", x_test, y_test[:-1], size=2)
