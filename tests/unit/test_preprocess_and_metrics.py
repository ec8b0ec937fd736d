"""MNIST-style normalisation of photos and drawings, and the evaluation metrics."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.evaluate import compute_metrics
from pipeline.preprocess import ImageError, NotADigitError, image_bytes_to_mnist, to_mnist, to_model_input


def _png(array: np.ndarray, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8), mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _dark_on_light_photo() -> np.ndarray:
    """A 300x200 'photo': light paper with a dark, off-centre stroke."""
    photo = np.full((300, 200), 230, np.uint8)
    photo[40:160, 20:50] = 30
    return photo


def test_dark_on_light_photo_becomes_white_on_black_centred_in_a_20px_box():
    digit = to_mnist(_dark_on_light_photo())
    assert digit.shape == (28, 28) and digit.dtype == np.uint8
    rows, cols = np.nonzero(digit > 0)
    assert rows.max() - rows.min() + 1 <= 21  # the longer side fits the 20x20 box (resampling may bleed one pixel)
    mass = digit.astype(float)
    cy = (np.arange(28) @ mass.sum(1)) / mass.sum()
    cx = (np.arange(28) @ mass.sum(0)) / mass.sum()
    assert abs(cy - 13.5) < 1.0 and abs(cx - 13.5) < 1.0
    assert digit[0].max() == 0 and digit[:, 0].max() == 0  # background is black


def test_polarity_does_not_matter():
    photo = _dark_on_light_photo()
    assert np.abs(to_mnist(photo).astype(int) - to_mnist(255 - photo).astype(int)).max() <= 1


def test_blank_image_is_not_a_digit():
    with pytest.raises(NotADigitError, match="no digit found"):
        to_mnist(np.full((50, 50), 200, np.uint8))


def test_rgba_drawing_on_transparent_canvas_is_read():
    canvas = np.zeros((100, 100, 4), np.uint8)
    canvas[20:80, 45:55] = (0, 0, 0, 255)  # black ink, transparent elsewhere
    assert image_bytes_to_mnist(_png(canvas, "RGBA")).max() > 200


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"hello, not an image", "not a readable image"),
        (_png(np.zeros((40, 40)))[:50], "corrupt or truncated|not a readable image"),
    ],
)
def test_bad_bytes_give_a_precise_error(data, message):
    with pytest.raises(ImageError, match=message):
        image_bytes_to_mnist(data)


def test_huge_image_is_refused_from_its_header():
    huge = Image.new("L", (9000, 10))
    buffer = io.BytesIO()
    huge.save(buffer, format="PNG")
    with pytest.raises(ImageError, match="9000x10 pixels"):
        image_bytes_to_mnist(buffer.getvalue())


@pytest.mark.parametrize(("width", "height"), [(0, 8), (8, 0)])
def test_image_with_a_zero_side_is_named_as_such(width, height):
    from tests.integration.serving_fixtures import png_claiming

    with pytest.raises(ImageError, match=f"{width}x{height} pixels; it needs at least 1x1"):
        image_bytes_to_mnist(png_claiming(width, height))


def test_unknown_format_names_its_first_bytes():
    with pytest.raises(ImageError, match=r"not a PNG, JPEG, WebP, BMP, GIF or TIFF image \(its first bytes are b'GIF00 not re'"):
        image_bytes_to_mnist(b"GIF00 not really")


def test_model_input_is_scaled_and_shaped():
    x = to_model_input(np.full((2, 28, 28), 255, np.uint8))
    assert x.shape == (2, 28, 28, 1) and x.dtype == np.float32 and x.max() == 1.0
    with pytest.raises(ImageError, match=r"\(n, 28, 28\)"):
        to_model_input(np.zeros((2, 27, 28)))


def test_metrics_from_a_known_confusion():
    y_true = np.array([0, 0, 1, 1, 2, 2, 3, 4, 5, 6, 7, 8, 9])
    y_pred = np.array([0, 1, 1, 1, 2, 2, 3, 4, 5, 6, 7, 8, 9])
    m = compute_metrics(y_true, y_pred)
    assert m.accuracy == pytest.approx(12 / 13)
    assert m.class_recall[0] == 0.5 and m.class_precision[1] == pytest.approx(2 / 3)
    assert m.class_f1[0] == pytest.approx(2 / 3) and m.confusion[0][1] == 1
    assert m.min_class_recall == 0.5 and m.weakest_class == 0
    assert m.flat()["test_recall_0"] == 0.5
