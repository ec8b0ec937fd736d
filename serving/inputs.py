"""Checking what clients send: raw pixel arrays, and precise reasons for unreadable image files.

Images are decoded by ``pipeline.preprocess.image_bytes_to_mnist`` (the one preprocessing path);
this module only sharpens its message when Pillow cannot identify a file at all, by reading the
header itself (a 0-pixel side, or which bytes the file starts with).
"""

from __future__ import annotations

import re
import struct
from typing import Any

import numpy as np

from pipeline.preprocess import SIDE, ImageError, image_bytes_to_mnist


class InputRefused(ValueError):
    """An input the service will not answer; the message says precisely why."""


# ---------------------------------------------------------------- image files


def declared_size(data: bytes) -> tuple[int, int] | None:
    """Width and height written in a PNG, GIF, BMP or JPEG header, without decoding; None if unknown."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", data[6:10])
        if data[:2] == b"BM" and len(data) >= 26:
            width, height = struct.unpack("<ii", data[18:26])
            return abs(width), abs(height)
        if data[:2] == b"\xff\xd8":
            i = 2
            while i + 9 <= len(data) and data[i] == 0xFF:
                marker = data[i + 1]
                if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
                    height, width = struct.unpack(">HH", data[i + 5 : i + 9])
                    return width, height
                i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    except struct.error:
        return None
    return None


def explain_image_error(err: ImageError, data: bytes) -> str:
    """The decoder's message, made precise when Pillow could not even identify the file."""
    message = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err))
    if "cannot identify image file" not in message:
        return message
    size = declared_size(data)
    if size is not None and min(size) < 1:
        return f"the image is {size[0]}x{size[1]} pixels; it needs at least 1x1"
    return f"not a readable image: the data is not a PNG, JPEG or other image format (its first bytes are {data[:12]!r})"


def read_digit(data: bytes) -> np.ndarray:
    """Image file bytes -> the 28x28 uint8 MNIST-style digit; ImageError with a precise message."""
    try:
        return image_bytes_to_mnist(data)
    except ImageError as err:
        raise ImageError(explain_image_error(err, data)) from None


# ---------------------------------------------------------------- raw pixels


def _where(mask: np.ndarray) -> str:
    image, row, col = (int(i) for i in np.argwhere(mask)[0])
    return f"image {image}, row {row}, column {col}"


def parse_pixels(raw: Any, max_images: int) -> np.ndarray:
    """Validate raw pixels (nested lists or an array) -> float32 (n, 28, 28) on the 0-255 scale.

    Accepts one image (28, 28) or a batch (n, 28, 28) of integers or floats in 0-255 (0 is the
    background, 255 full ink, as in MNIST). Everything else raises InputRefused saying what is wrong.
    """
    if raw is None:
        raise InputRefused("pixels is null: send one 28x28 array of numbers 0-255, or a batch (n, 28, 28)")
    if isinstance(raw, str | bytes | dict | int | float | bool):
        raise InputRefused(f"pixels must be a 28x28 array or a batch (n, 28, 28) of numbers; got a {type(raw).__name__}")
    # refuse an oversized batch before converting it
    if isinstance(raw, list) and len(raw) > max_images and isinstance(raw[0], list) and raw[0] and isinstance(raw[0][0], list):
        raise InputRefused(f"the batch holds {len(raw):,} images; the limit is {max_images:,} per request")
    try:
        array = raw if isinstance(raw, np.ndarray) else np.asarray(raw)
    except (ValueError, TypeError) as err:
        raise InputRefused(f"pixels is not a rectangular array: rows or images differ in length ({err})") from None
    if array.dtype == object:
        raise InputRefused("pixels must hold only numbers 0-255 (found null, nested objects or rows of different lengths)")
    if array.dtype.kind == "b":
        raise InputRefused("pixels must be numbers 0-255, not booleans")
    if array.dtype.kind not in "iuf":
        kind = "strings" if array.dtype.kind in "US" else f"values of type {array.dtype}"
        raise InputRefused(f"pixels must be numbers 0-255; got {kind}")
    if array.size == 0:
        raise InputRefused(f"pixels is empty (shape {array.shape}): send one 28x28 image or a batch (n, 28, 28)")
    shape = array.shape
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1:] != (SIDE, SIDE):
        raise InputRefused(f"pixels has shape {shape}; expected one image (28, 28) or a batch (n, 28, 28)")
    if len(array) > max_images:
        raise InputRefused(f"the batch holds {len(array):,} images; the limit is {max_images:,} per request")
    array = array.astype(np.float32)
    bad = ~np.isfinite(array)
    if bad.any():
        raise InputRefused(f"pixels holds {int(bad.sum())} NaN or infinite value(s), the first at {_where(bad)}")
    for mask, what in ((array < 0, "below 0"), (array > 255, "above 255")):
        if count := int(mask.sum()):
            raise InputRefused(
                f"pixel values must lie within 0-255; {count} {'is' if count == 1 else 'are'} "
                f"{what}, the first {array[mask][0]:g} at {_where(mask)}"
            )
    if array.max() <= 1.0 and (array != np.rint(array)).any():
        raise InputRefused(
            f"pixel values look normalised to 0-1 (the largest is {array.max():g}); "
            "send them on the 0-255 scale (0 = background, 255 = ink)"
        )
    return array
