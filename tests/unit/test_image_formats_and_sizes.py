"""Which images are decoded at all, and how large: only six formats' decoders run, a decompression bomb is
refused from its header, and a large photo is reduced while (or right after) it is decoded."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline.preprocess import DECODE_SIDE, MAX_PIXELS, ImageError, decode_image, image_bytes_to_mnist


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _seven(side: int = 300) -> Image.Image:
    """A dark 7 on white paper."""
    image = Image.new("L", (side, side), 255)
    draw = ImageDraw.Draw(image)
    width = max(2, side // 20)
    draw.line([(0.3 * side, 0.25 * side), (0.7 * side, 0.25 * side), (0.45 * side, 0.8 * side)], fill=0, width=width)
    return image


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"])
def test_the_six_accepted_formats_are_read(fmt):
    digit = image_bytes_to_mnist(_encoded(_seven().convert("RGB") if fmt == "JPEG" else _seven(), fmt))
    assert digit.shape == (28, 28) and digit.max() > 200


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        ("EPS", "PostScript (EPS) files are not accepted: send a PNG, JPEG, WebP, BMP, GIF or TIFF image"),
        ("PDF", "PDF files are not accepted"),
        ("ICO", "ICO files are not accepted"),
        ("PPM", "not a readable image: the data is not a PNG, JPEG, WebP, BMP, GIF or TIFF image"),
        ("TGA", "not a readable image: the data is not a PNG, JPEG, WebP, BMP, GIF or TIFF image"),
    ],
)
def test_other_formats_never_reach_a_decoder_and_say_what_to_send(fmt, message):
    # Pillow reads all of these (EPS through Ghostscript, when it is installed): the service must not
    with pytest.raises(ImageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        decode_image(_encoded(_seven().convert("RGB"), fmt))


def test_a_decompression_bomb_is_refused_from_its_header():
    bomb = _encoded(Image.new("1", (6300, 6300), 1), "PNG")  # two-tone: a few KB on the wire, 40 MP decoded
    assert len(bomb) < 64 * 1024
    with pytest.raises(ImageError, match="would decode to 6300x6300 pixels; the limit is 16,777,216"):
        decode_image(bomb)


def test_the_pixel_cap_fits_a_phone_photo():
    assert 4608 * 3456 <= MAX_PIXELS < 6300 * 6300
    with pytest.raises(ImageError, match="5200x4000 pixels"):
        decode_image(_encoded(Image.new("L", (5200, 4000), 255), "PNG"))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_a_phone_photo_is_reduced_while_decoding(fmt):
    photo = _seven(3456).resize((4608, 3456)).convert("RGB")
    decoded = decode_image(_encoded(photo, fmt))
    assert DECODE_SIDE <= max(decoded.size) <= 2 * DECODE_SIDE, decoded.size
    assert abs(decoded.width / decoded.height - 4608 / 3456) < 0.01


def test_a_large_jpeg_counts_at_the_scale_it_is_decoded_at():
    # 48 MP in the header, about 0.75 MP decoded at 1/8: a high-resolution phone photo is read
    digit = image_bytes_to_mnist(_encoded(_seven(6000).resize((8000, 6000)).convert("RGB"), "JPEG"))
    assert digit.max() > 200


def test_a_reduced_photo_reads_like_the_same_photo_small():
    small = image_bytes_to_mnist(_encoded(_seven(600), "PNG")).astype(float)
    large = image_bytes_to_mnist(_encoded(_seven(3600), "PNG")).astype(float)
    assert np.corrcoef(small.ravel(), large.ravel())[0, 1] > 0.9
