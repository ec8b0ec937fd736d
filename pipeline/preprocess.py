"""One preprocessing path for training, evaluation and serving, so they cannot drift apart.

A photo or drawing becomes an MNIST-style digit: grayscale, white ink on black, cropped to the
ink, scaled into a 20x20 box and centred by its centre of mass in a 28x28 frame.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SIDE = 28
BOX = 20
# a digit photo needs no more; larger files are refused before they are decoded
MAX_SIDE = 8192
MAX_PIXELS = 40_000_000
MAX_BYTES = 20 * 1024 * 1024


class ImageError(ValueError):
    """An input that cannot be read as a digit image; the message says what was wrong."""


def decode_image(data: bytes) -> Image.Image:
    """Decode PNG/JPEG (or any format Pillow reads) bytes, refusing empty, huge and broken files."""
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    if len(data) > MAX_BYTES:
        raise ImageError(f"the image is {len(data):,} bytes; the limit is {MAX_BYTES:,}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_size(image.width, image.height)
            image.load()
    except UnidentifiedImageError:
        raise ImageError(_unidentified(data)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"not a readable image: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:
        if isinstance(err, ImageError):
            raise
        raise ImageError(f"the image is corrupt or truncated: {err}") from None
    return image


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


def _unidentified(data: bytes) -> str:
    """Why Pillow could not identify a file: Pillow refuses 0-pixel images without saying so."""
    size = declared_size(data)
    if size is not None and min(size) < 1:
        return f"the image is {size[0]}x{size[1]} pixels; it needs at least 1x1"
    return f"not a readable image: the data is not a PNG, JPEG or other image format (its first bytes are {data[:12]!r})"


def _check_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ImageError(f"the image is {width}x{height} pixels; it needs at least 1x1")
    if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
        raise ImageError(
            f"the image is {width}x{height} pixels; the limit is {MAX_SIDE} on a side "
            f"and {MAX_PIXELS:,} in all (scale it down first)"
        )


def to_grayscale(image: Image.Image) -> np.ndarray:
    """A uint8 2-D array; transparent pixels count as background (white)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(ImageOps.exif_transpose(image).convert("L"), dtype=np.uint8)


def to_mnist(gray: np.ndarray) -> np.ndarray:
    """Normalise a grayscale digit of any size and polarity to a 28x28 uint8 MNIST-style image."""
    gray = np.asarray(gray, dtype=np.float32)
    if gray.ndim != 2 or gray.size == 0:
        raise ImageError(f"expected a 2-D grayscale image, got shape {gray.shape}")
    # polarity: the border is background; MNIST wants white ink on black
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    ink = 255.0 - gray if np.median(border) > 127 else gray
    # stretch contrast and drop faint background texture (paper grain, shadows)
    low, high = np.percentile(ink, 5), ink.max()
    if high - low < 1:
        return np.zeros((SIDE, SIDE), dtype=np.uint8)
    ink = np.clip((ink - low) / (high - low), 0, 1)
    ink[ink < 0.2] = 0
    rows, cols = np.nonzero(ink)
    if rows.size == 0:
        return np.zeros((SIDE, SIDE), dtype=np.uint8)
    crop = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    # scale the longer side to BOX, keeping the aspect ratio
    scale = BOX / max(crop.shape)
    height, width = max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))
    small = Image.fromarray((crop * 255).astype(np.uint8)).resize((width, height), Image.Resampling.LANCZOS)
    digit = np.asarray(small, dtype=np.float32)
    # paste so that the centre of mass lands in the middle of the frame
    total = digit.sum()
    cy, cx = (
        (np.arange(height) @ digit.sum(1) / total, np.arange(width) @ digit.sum(0) / total)
        if total > 0
        else ((height - 1) / 2, (width - 1) / 2)
    )
    top = int(np.clip(round(SIDE / 2 - 0.5 - cy), 0, SIDE - height))
    left = int(np.clip(round(SIDE / 2 - 0.5 - cx), 0, SIDE - width))
    frame = np.zeros((SIDE, SIDE), dtype=np.float32)
    frame[top : top + height, left : left + width] = digit
    return np.clip(np.rint(frame), 0, 255).astype(np.uint8)


def image_bytes_to_mnist(data: bytes) -> np.ndarray:
    """Bytes of an uploaded photo or drawing -> a 28x28 uint8 MNIST-style digit."""
    return to_mnist(to_grayscale(decode_image(data)))


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 (n, 28, 28) pixels -> the float32 (n, 28, 28, 1) tensor in [0, 1] the CNN takes."""
    images = np.asarray(images)
    if images.ndim == 2:
        images = images[None]
    if images.shape[1:] != (SIDE, SIDE):
        raise ImageError(f"expected images of shape (n, 28, 28), got {images.shape}")
    return (images.astype(np.float32) / 255.0)[..., None]
