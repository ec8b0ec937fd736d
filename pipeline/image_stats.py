"""What a normalised 28x28 digit looks like, in a few numbers: the inputs' side of drift monitoring.

The same statistics are computed for every answered request (the prediction log) and for the
training images (the reference the monitor compares a window of the log with).
"""

from __future__ import annotations

import numpy as np

# a pixel is ink from this level up (0-255): MNIST's anti-aliased edges stay out of the box
INK_LEVEL = 64
STATISTICS = ("ink_share", "box_top", "box_left", "box_bottom", "box_right", "centre_row", "centre_col", "stroke_width")


def image_statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """For images (n, 28, 28) on the 0-255 scale: one array of n values per name in ``STATISTICS``.

    ``ink_share`` is the share of ink pixels; the box is the ink's bounding box (inclusive rows and
    columns, -1 for an image without ink); the centre is the intensity-weighted centre of mass;
    ``stroke_width`` is twice the ink's area over its outline (a stroke of length L and width w has
    area L*w and an outline of about 2L).
    """
    images = np.asarray(images).reshape(-1, 28, 28)
    if images.dtype != np.uint8:  # the log's and MNIST's images are uint8 already: no copy of a whole window as floats
        images = images.astype(np.float32)
    ink = images >= INK_LEVEL
    count = ink.sum(axis=(1, 2))
    rows, cols = ink.any(axis=2), ink.any(axis=1)
    has_ink = count > 0

    def first(mask: np.ndarray) -> np.ndarray:
        return np.where(has_ink, mask.argmax(axis=1), -1)

    def last(mask: np.ndarray) -> np.ndarray:
        return np.where(has_ink, mask.shape[1] - 1 - mask[:, ::-1].argmax(axis=1), -1)

    row_mass, col_mass = images.sum(axis=2, dtype=np.float64), images.sum(axis=1, dtype=np.float64)
    mass = row_mass.sum(axis=1)
    safe = np.where(mass > 0, mass, 1.0)
    index = np.arange(28, dtype=np.float64)
    centre_row = np.where(mass > 0, row_mass @ index / safe, 13.5)
    centre_col = np.where(mass > 0, col_mass @ index / safe, 13.5)

    padded = np.pad(ink, ((0, 0), (1, 1), (1, 1)))
    interior = padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1] & padded[:, 1:-1, :-2] & padded[:, 1:-1, 2:]
    outline = (ink & ~interior).sum(axis=(1, 2))
    stroke = np.where(outline > 0, 2.0 * count / np.maximum(outline, 1), 0.0)
    return {
        "ink_share": (count / (28 * 28)).astype(np.float32),
        "box_top": first(rows),
        "box_left": first(cols),
        "box_bottom": last(rows),
        "box_right": last(cols),
        "centre_row": centre_row.astype(np.float32),
        "centre_col": centre_col.astype(np.float32),
        "stroke_width": stroke.astype(np.float32),
    }
