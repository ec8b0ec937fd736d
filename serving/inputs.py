"""Checking raw pixel arrays that clients send (image files are checked by ``pipeline.preprocess``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.preprocess import SIDE


class InputRefused(ValueError):
    """An input the service will not answer; the message says precisely why."""


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
