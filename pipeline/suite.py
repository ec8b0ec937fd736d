"""An out-of-distribution suite: families of digits rendered from MNIST's test images, as image bytes.

Each family applies one kind of change a real user's digit shows (a shift, a rotation, thin or thick
strokes, noise, the opposite polarity, heavy JPEG, a phone photo of ink on paper, ...) to a balanced,
seeded sample of MNIST's *test* images, and encodes every image as PNG or JPEG, so that a family is
scored through the same photo path the service uses (``image_bytes_to_mnist``).

Determinism: every random choice comes from ``numpy.random.default_rng`` seeded by (seed, family,
test index), and pixels are computed with integer Pillow filters and plain float arithmetic (no
transcendental array functions, no BLAS), so a build gives the same bytes on every run and machine
with the locked package set. PNGs are stored uncompressed, so their bytes depend on no deflate library.
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter
from scipy import ndimage

SIDE = 28
DEFAULT_SIZE = 1000
DEFAULT_SEED = 0

Renderer = Callable[[np.ndarray, np.random.Generator], bytes]


@dataclass(frozen=True, eq=False)  # arrays have no single truth value, so families compare by identity
class Family:
    """One family of the suite: encoded images, their labels and the test images they came from."""

    name: str
    description: str
    image_format: str  # "PNG" or "JPEG": the format of every image in ``images``
    images: tuple[bytes, ...]
    labels: np.ndarray  # int64 (n,)
    source_indices: np.ndarray  # int64 (n,): the index of each image's digit in x_test

    def __len__(self) -> int:
        return len(self.images)


class NormalisedFamily(NamedTuple):
    pixels: np.ndarray  # uint8 (n, 28, 28); all zero where refused
    refused: np.ndarray  # bool (n,): the normaliser raised ImageError; a caller counts these as wrong answers


# ---------------------------------------------------------------- encoding and small helpers


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # stored, not deflated: the bytes then depend on no zlib implementation, and encoding is faster
    Image.fromarray(_to_uint8(pixels)).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    subsampling = "4:2:0" if image.mode == "RGB" else "4:4:4"
    image.save(buffer, format="JPEG", quality=quality, subsampling=subsampling, optimize=False)
    return buffer.getvalue()


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    return np.clip(pixels + 0.5, 0, 255).astype(np.uint8)  # rounds half up, in one pass fewer than rint


def _pad(digit: np.ndarray, side: int) -> np.ndarray:
    """The digit centred in a square canvas of ``side`` pixels, so that a transform does not cut it."""
    canvas = np.zeros((side, side), np.uint8)
    offset = (side - digit.shape[0]) // 2
    canvas[offset : offset + digit.shape[0], offset : offset + digit.shape[1]] = digit
    return canvas


def _ink_box(ink: np.ndarray, level: float) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), bottom and right exclusive, of the pixels above ``level``."""
    rows, cols = np.nonzero(ink > level)
    if rows.size == 0:
        return 0, ink.shape[0], 0, ink.shape[1]
    return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1


def _signed(rng: np.random.Generator, low: float, high: float) -> float:
    """A magnitude in [low, high] with a random sign."""
    return float(rng.uniform(low, high)) * (1.0 if rng.random() < 0.5 else -1.0)


def _smooth_field(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """A smooth random field in about [-1, 1]: a coarse grid of normals upsampled bicubically."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    field = Image.fromarray(coarse, mode="F").resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(field, dtype=np.float32) / 2.0


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _upscaled(digit: np.ndarray, factor: int) -> np.ndarray:
    image = Image.fromarray(digit).resize((SIDE * factor, SIDE * factor), Image.Resampling.BICUBIC)
    return np.asarray(image)


def _downscaled(pixels: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((SIDE, SIDE), Image.Resampling.LANCZOS))


# ---------------------------------------------------------------- MNIST-style families (white ink on black)


def _clean(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    return _png(digit)


def _shifted(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    side = int(rng.integers(48, 97))
    # the digit's centre at least half-way from the canvas centre to the farthest place it fits
    reach = (side - SIDE) / 2
    angle, radius = float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0.5, 1.0)) * reach
    top = int(np.clip(round(reach + radius * math.sin(angle)), 0, side - SIDE))
    left = int(np.clip(round(reach + radius * math.cos(angle)), 0, side - SIDE))
    canvas = np.zeros((side, side), np.uint8)
    canvas[top : top + SIDE, left : left + SIDE] = digit
    return _png(canvas)


def _rotated(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    degrees = _signed(rng, 15, 30)
    image = Image.fromarray(_pad(digit, 40)).rotate(degrees, Image.Resampling.BICUBIC, fillcolor=0)
    return _png(np.asarray(image))


def _scaled(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    if rng.random() < 0.5:
        # small: a few pixels tall in an MNIST-sized frame, so strokes lose their detail
        side = max(8, round(SIDE * float(rng.uniform(0.3, 0.55))))
        small = np.asarray(Image.fromarray(digit).resize((side, side), Image.Resampling.LANCZOS))
        frame = np.zeros((SIDE, SIDE), np.uint8)
        top, left = (int(v) for v in rng.integers(0, SIDE - side + 1, size=2))
        frame[top : top + side, left : left + side] = small
        return _png(frame)
    # large: blown up and cropped to the ink with a thin margin, so the digit fills the frame
    side = round(SIDE * float(rng.uniform(2.0, 4.0)))
    large = np.asarray(Image.fromarray(digit).resize((side, side), Image.Resampling.BICUBIC))
    top, bottom, left, right = _ink_box(large, 40)
    margin = int(rng.integers(0, 4))
    return _png(large[max(0, top - margin) : bottom + margin, max(0, left - margin) : right + margin])


def _sheared(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    side = 44
    across, down = _signed(rng, 0.3, 0.6), _signed(rng, 0.0, 0.2)
    centre = (side - 1) / 2
    # output (x, y) samples input (x + across (y - c), y + down (x - c)): a shear about the centre
    coefficients = (1.0, across, -across * centre, down, 1.0, -down * centre)
    image = Image.fromarray(_pad(digit, side)).transform(
        (side, side), Image.Transform.AFFINE, coefficients, Image.Resampling.BICUBIC, fillcolor=0
    )
    return _png(np.asarray(image))


_CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)


def _stroke_changed(digit: np.ndarray, radius: int, thinner: bool) -> np.ndarray:
    """The digit eroded or dilated by an octagon of ``radius`` pixels at three times its resolution."""
    # at three times the resolution, each pixel of the footprint is a third of a pixel of the stroke
    image = _upscaled(digit, 3)
    morph = ndimage.grey_erosion if thinner else ndimage.grey_dilation
    for step in range(radius):  # alternating a cross and a square grows an octagon, close to a disk, cheaply
        image = morph(image, footprint=_CROSS) if step % 2 else morph(image, size=(3, 3))
    return _downscaled(image)


def _thin(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    radius = int(rng.integers(2, 4))
    thin = _stroke_changed(digit, radius, thinner=True)
    # an eroded digit keeps at least a quarter of its ink, so that a thin "1" does not vanish
    while radius > 1 and thin.astype(np.int64).sum() < digit.astype(np.int64).sum() // 4:
        radius -= 1
        thin = _stroke_changed(digit, radius, thinner=True)
    return _png(thin)


def _thick(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    return _png(_stroke_changed(digit, int(rng.integers(3, 7)), thinner=False))


def _motion_kernel(length: int, degrees: float) -> np.ndarray:
    size = length + 2 if length % 2 else length + 1
    canvas = Image.new("L", (size, size), 0)
    centre, half = (size - 1) / 2, (length - 1) / 2
    dx, dy = half * math.cos(math.radians(degrees)), half * math.sin(math.radians(degrees))
    ImageDraw.Draw(canvas).line([(centre - dx, centre - dy), (centre + dx, centre + dy)], fill=255, width=1)
    kernel = np.asarray(canvas, dtype=np.float64)
    return kernel / kernel.sum()


def _blurred(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    padded = _pad(digit, 40)
    if rng.random() < 0.5:
        image = Image.fromarray(padded).filter(ImageFilter.GaussianBlur(float(rng.uniform(1.0, 2.2))))
        return _png(np.asarray(image))
    # a camera that moved: a straight line kernel at a random angle
    kernel = _motion_kernel(int(rng.integers(3, 7)), float(rng.uniform(0, 180)))
    return _png(ndimage.convolve(padded.astype(np.float64), kernel, mode="constant"))


def _noisy(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    if rng.random() < 0.5:
        sigma = float(rng.uniform(35, 70))
        return _png(digit + sigma * rng.standard_normal(digit.shape))
    noisy = digit.copy()
    hit = rng.random(digit.shape) < float(rng.uniform(0.04, 0.12))
    noisy[hit] = np.where(rng.random(int(hit.sum())) < 0.5, 0, 255)
    return _png(noisy)


def _low_contrast(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    # grey ink a little darker than grey paper, the paper anywhere from dim to light
    paper = float(rng.uniform(90, 200))
    contrast = float(rng.uniform(30, 60))
    return _png(paper - contrast * (digit / 255.0))


def _inverted(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    return _png(255 - digit)


def _jpeg_family(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    return _jpeg(Image.fromarray(digit), int(rng.integers(5, 21)))


def _elastic(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    side = 36
    strength = float(rng.uniform(2.0, 3.5))
    shift_rows = strength * _smooth_field(rng, side, side, 4)
    shift_cols = strength * _smooth_field(rng, side, side, 4)
    rows, cols = np.mgrid[0:side, 0:side].astype(np.float32)
    warped = ndimage.map_coordinates(_pad(digit, side).astype(np.float32), [rows + shift_rows, cols + shift_cols], order=1)
    return _png(warped)


# ---------------------------------------------------------------- photographed: ink on paper through a phone camera

_INK_KINDS = ("black", "blue", "pencil")
_INK_ODDS = (0.4, 0.4, 0.2)


def _ink_alpha(digit: np.ndarray, height: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """The digit as ink coverage in [0, 1], ``height`` pixels tall: smoothly upscaled, cut to a pen-like edge."""
    top, bottom, left, right = _ink_box(digit, 25)
    crop = digit[max(0, top - 1) : bottom + 1, max(0, left - 1) : right + 1]
    scale = height / crop.shape[0]
    width = max(4, round(crop.shape[1] * scale))
    large = Image.fromarray(crop).resize((width, height), Image.Resampling.BICUBIC)
    large = large.rotate(_signed(rng, 0, 7), Image.Resampling.BICUBIC, expand=True, fillcolor=0)
    coverage = np.asarray(large, dtype=np.float32) / 255.0
    # a cut through the grey edge sets the stroke width (lower cut, thicker pen); a blur anti-aliases it
    cut = float(rng.uniform(0.5, 0.65)) if kind == "pencil" else float(rng.uniform(0.25, 0.6))
    pen = _smoothstep((coverage - cut) / 0.12 + 0.5)
    edge = max(0.4, height / 110 * float(rng.uniform(0.4, 1.0)))
    softened = Image.fromarray(_to_uint8(pen * 255)).filter(ImageFilter.GaussianBlur(edge))
    alpha = np.asarray(softened, dtype=np.float32) / 255.0
    # pen pressure varies along the stroke; pencil leaves graphite only on the paper's high points
    alpha *= 1.0 - 0.25 * np.abs(_smooth_field(rng, *alpha.shape, cells=3))
    if kind == "pencil":
        alpha *= float(rng.uniform(0.6, 0.85)) * rng.uniform(0.55, 1.0, size=alpha.shape).astype(np.float32)
    return np.clip(alpha, 0.0, 1.0)


def _ink_colour(kind: str, rng: np.random.Generator) -> tuple[int, int, int]:
    if kind == "blue":
        return int(rng.integers(15, 51)), int(rng.integers(35, 81)), int(rng.integers(110, 171))
    grey = int(rng.integers(70, 111)) if kind == "pencil" else int(rng.integers(20, 56))
    r, g, b = (grey + int(v) for v in rng.integers(-5, 6, size=3))
    return r, g, b


def _paper(height: int, width: int, rng: np.random.Generator) -> Image.Image:
    """White to cream paper with a faint mottling and grain."""
    cream = float(rng.uniform(0, 1))
    base = round(252 - 4 * cream), round(250 - 12 * cream), round(248 - 38 * cream)
    mottling = float(rng.uniform(2, 6)) * _smooth_field(rng, height, width, cells=6)
    grain = float(rng.uniform(1.5, 4)) * rng.standard_normal((height, width), dtype=np.float32)
    return _added(Image.new("RGB", (width, height), base), mottling + grain)


def _added(image: Image.Image, offset: np.ndarray) -> Image.Image:
    """``image`` plus a grey ``offset`` per pixel, clipped: integer arithmetic in Pillow, not float in numpy."""
    grey = Image.fromarray(_to_uint8(offset + 128.0))
    return ImageChops.add(image, Image.merge("RGB", (grey, grey, grey)), offset=-128)


def _line_profile(length: int, spacing: float, phase: float, half_width: float) -> np.ndarray:
    """Coverage in [0, 1] along one axis of anti-aliased lines every ``spacing`` pixels."""
    position = (np.arange(length, dtype=np.float32) - phase) % spacing
    distance = np.minimum(position, spacing - position)
    return np.clip(half_width + 0.5 - distance, 0.0, 1.0)


def _lay(sheet: Image.Image, colour: tuple[int, int, int], coverage: np.ndarray) -> None:
    """Lay ``colour`` over the sheet where ``coverage`` (in [0, 1], broadcast to the sheet's shape) says."""
    mask = np.broadcast_to(_to_uint8(255 * coverage), (sheet.height, sheet.width))
    sheet.paste(colour, (0, 0, sheet.width, sheet.height), Image.fromarray(np.ascontiguousarray(mask)))


def _rule(sheet: Image.Image, digit_height: int, rng: np.random.Generator) -> None:
    """Ruled or squared lines, blue or grey, at a spacing a handwritten digit spans once or twice."""
    style = rng.choice(("plain", "ruled", "squared"), p=(0.35, 0.45, 0.2))
    if style == "plain":
        return
    if rng.random() < 0.65:
        colour = int(rng.integers(140, 191)), int(rng.integers(175, 211)), int(rng.integers(220, 246))
    else:
        grey = int(rng.integers(150, 196))
        colour = grey, grey, grey
    half_width = max(0.5, sheet.height / 400) * float(rng.uniform(0.5, 1.3))
    strength = float(rng.uniform(0.5, 0.9))
    if style == "ruled":
        spacing = digit_height * float(rng.uniform(0.6, 1.2))
        coverage = _line_profile(sheet.height, spacing, float(rng.uniform(0, spacing)), half_width)[:, None]
    else:
        spacing = digit_height * float(rng.uniform(0.35, 0.7))
        across = _line_profile(sheet.height, spacing, float(rng.uniform(0, spacing)), half_width)[:, None]
        down = _line_profile(sheet.width, spacing, float(rng.uniform(0, spacing)), half_width)[None, :]
        coverage = np.maximum(across, down)
    _lay(sheet, colour, strength * coverage)
    if style == "ruled" and rng.random() < 0.25:
        # the red margin line of an exercise book, near the left edge
        where = float(rng.uniform(0.04, 0.15)) * sheet.width
        margin = _line_profile(sheet.width, 10 * sheet.width, where, half_width * 1.5)[None, :]
        _lay(sheet, (225, 110, 120), strength * margin)


def _solve(matrix: list[list[float]], values: list[float]) -> list[float]:
    """Gaussian elimination in Python floats: the same result on every CPU, unlike a BLAS solve."""
    n = len(values)
    rows = [list(row) + [value] for row, value in zip(matrix, values, strict=True)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(rows[r][col]))
        rows[col], rows[pivot] = rows[pivot], rows[col]
        for r in range(n):
            if r != col:
                factor = rows[r][col] / rows[col][col]
                rows[r] = [a - factor * b for a, b in zip(rows[r], rows[col], strict=True)]
    return [rows[i][n] / rows[i][i] for i in range(n)]


def _perspective_coefficients(
    output_corners: list[tuple[float, float]], input_corners: list[tuple[float, float]]
) -> tuple[float, ...]:
    """Pillow's PERSPECTIVE data mapping each output corner onto its input corner."""
    matrix, values = [], []
    for (x, y), (u, v) in zip(output_corners, input_corners, strict=True):
        matrix.append([x, y, 1.0, 0.0, 0.0, 0.0, -u * x, -u * y])
        matrix.append([0.0, 0.0, 0.0, x, y, 1.0, -v * x, -v * y])
        values.extend((u, v))
    return tuple(_solve(matrix, values))


def _lighting(height: int, width: int, rng: np.random.Generator) -> Image.Image:
    """255 times the light per pixel and channel: a gradient across the frame, then a shadow band or a vignette,
    tinted by the camera's white balance."""
    # light varies slowly, so it is computed on a coarse grid and upsampled
    rows, cols = np.mgrid[0 : height // 4 + 2, 0 : width // 4 + 2].astype(np.float32)
    rows, cols = rows / (height // 4 + 1), cols / (width // 4 + 1)
    angle = float(rng.uniform(0, 2 * math.pi))
    along = (cols - 0.5) * math.cos(angle) + (rows - 0.5) * math.sin(angle)  # in about [-0.7, 0.7]
    light = 1.0 - float(rng.uniform(0.05, 0.3)) * (along + 0.71) / 1.42
    if rng.random() < 0.55:
        # a hand or phone's shadow: a half-plane with a soft edge, entering from a random side
        angle = float(rng.uniform(0, 2 * math.pi))
        across = (cols - 0.5) * math.cos(angle) + (rows - 0.5) * math.sin(angle)
        edge, softness = float(rng.uniform(0.1, 0.45)), float(rng.uniform(0.03, 0.25))
        inside = _smoothstep((across - edge) / softness + 0.5)
        light = light * (1.0 - float(rng.uniform(0.15, 0.45)) * inside)
    else:
        distance = np.sqrt((cols - 0.5) ** 2 + (rows - 0.5) ** 2) / math.sqrt(0.5)
        light = light * (1.0 - float(rng.uniform(0.15, 0.4)) * _smoothstep((distance - 0.45) / 0.55))
    exposure = float(rng.uniform(0.8, 1.0))
    white_balance = exposure * (1 + rng.uniform(-0.04, 0.04, 3)).astype(np.float32)
    coarse = Image.fromarray(_to_uint8(255 * light[:, :, None] * white_balance))
    return coarse.resize((width, height), Image.Resampling.BILINEAR)


def _sheet_corners_seen(height: int, width: int, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Where the camera's four corners fall on the sheet: a slight tilt, sometimes past one edge onto the table."""
    jitter = 0.08 * min(height, width)
    corners = [(0.0, 0.0), (width, 0.0), (width, height), (0.0, height)]
    inward = [(1, 1), (-1, 1), (-1, -1), (1, -1)]  # each corner a little inside the sheet, so it fills the frame
    seen = [
        (x + sx * float(rng.uniform(0, jitter)), y + sy * float(rng.uniform(0, jitter)))
        for (x, y), (sx, sy) in zip(corners, inward, strict=True)
    ]
    if rng.random() < 0.35:
        side = int(rng.integers(0, 4))  # the top, right, bottom or left edge of the sheet shows
        reach = float(rng.uniform(0.04, 0.12))
        dx, dy = ((0, -height), (width, 0), (0, height), (-width, 0))[side]
        for i in (side, (side + 1) % 4):
            seen[i] = (seen[i][0] + reach * dx, seen[i][1] + reach * dy)
    return seen


_TABLES = ((120, 90, 60), (90, 90, 95), (160, 130, 95), (60, 55, 50))


def _photographed(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    height = int(rng.integers(150, 401))
    width = int(np.clip(round(height * float(rng.uniform(0.75, 1.33))), 150, 400))
    # the sheet is drawn at a lower resolution and enlarged: the camera's blur, at a fraction of a filter's cost
    softness = float(rng.uniform(1.0, 2.0))
    sheet_height, sheet_width = round(height / softness), round(width / softness)
    kind = str(rng.choice(_INK_KINDS, p=_INK_ODDS))
    alpha = _ink_alpha(digit, round(sheet_height * float(rng.uniform(0.3, 0.6))), kind, rng)
    # the sheet: paper, lines, then ink laid over them
    sheet = _paper(sheet_height, sheet_width, rng)
    _rule(sheet, alpha.shape[0], rng)
    ink_height, ink_width = min(alpha.shape[0], sheet_height), min(alpha.shape[1], sheet_width)
    top = int(np.clip(round((sheet_height - ink_height) * float(rng.uniform(0.3, 0.7))), 0, sheet_height - ink_height))
    left = int(np.clip(round((sheet_width - ink_width) * float(rng.uniform(0.3, 0.7))), 0, sheet_width - ink_width))
    ink = Image.fromarray(_to_uint8(255 * alpha[:ink_height, :ink_width]))
    sheet.paste(_ink_colour(kind, rng), (left, top, left + ink_width, top + ink_height), ink)
    # the camera: perspective, focus, then light and white balance, sensor noise and JPEG
    table = _TABLES[int(rng.integers(0, len(_TABLES)))]
    frame = [(0.0, 0.0), (sheet_width, 0.0), (sheet_width, sheet_height), (0.0, sheet_height)]
    coefficients = _perspective_coefficients(frame, _sheet_corners_seen(sheet_height, sheet_width, rng))
    photo = sheet.transform(
        (sheet_width, sheet_height), Image.Transform.PERSPECTIVE, coefficients, Image.Resampling.BILINEAR, fillcolor=table
    )
    photo = photo.resize((width, height), Image.Resampling.BICUBIC)
    photo = ImageChops.multiply(photo, _lighting(height, width, rng))
    photo = _added(photo, float(rng.uniform(2, 7)) * rng.standard_normal((height, width), dtype=np.float32))
    return _jpeg(photo, int(rng.integers(60, 91)))


# ---------------------------------------------------------------- the families


@dataclass(frozen=True)
class _Spec:
    description: str
    image_format: str
    render: Renderer


_SPECS: dict[str, _Spec] = {
    "clean": _Spec(
        "The test digits unchanged (28x28, white on black): the control the other families are read against.", "PNG", _clean
    ),
    "shifted": _Spec("The digit far off-centre in a larger black canvas (48-96 px).", "PNG", _shifted),
    "rotated": _Spec("The digit rotated by 15-30 degrees either way.", "PNG", _rotated),
    "scaled": _Spec(
        "The digit tiny (a third to half the frame) or blown up 2-4x and cropped tight, so it fills the frame.", "PNG", _scaled
    ),
    "sheared": _Spec("The digit slanted like italic handwriting (horizontal shear 0.3-0.6, a little vertical).", "PNG", _sheared),
    "thin": _Spec("Thin strokes: the digit eroded, like a fine pen.", "PNG", _thin),
    "thick": _Spec("Thick strokes: the digit dilated, like a marker.", "PNG", _thick),
    "blurred": _Spec("The digit out of focus (gaussian blur) or moved (motion blur along a random direction).", "PNG", _blurred),
    "noisy": _Spec("Heavy gaussian noise or salt-and-pepper specks over the whole image.", "PNG", _noisy),
    "low_contrast": _Spec(
        "Grey ink slightly darker than grey paper, the paper anywhere from dim to light.", "PNG", _low_contrast
    ),
    "inverted": _Spec(
        "Black ink on white paper, the usual polarity of a photo or scan (MNIST is white on black).", "PNG", _inverted
    ),
    "jpeg": _Spec("The digit saved as a JPEG at quality 5-20: blocks and ringing around the strokes.", "JPEG", _jpeg_family),
    "elastic": _Spec("The digit warped by a smooth random displacement, like a shaky or hurried hand.", "PNG", _elastic),
    "photographed": _Spec(
        "A phone photo: black, blue or pencil ink on white-to-cream paper (some ruled or squared) at 150-400 px, "
        "with a light gradient, a shadow or vignette, slight perspective (sometimes the table past the sheet's edge), "
        "camera blur, sensor noise and JPEG at quality 60-90.",
        "JPEG",
        _photographed,
    ),
}

CONTROL_NAME = "clean"
# the families scored by default; the control is built only when asked for by name
FAMILY_NAMES: tuple[str, ...] = tuple(name for name in _SPECS if name != CONTROL_NAME)
DESCRIPTIONS: dict[str, str] = {name: spec.description for name, spec in _SPECS.items()}


def _stable_key(name: str) -> int:
    return zlib.crc32(name.encode())  # unlike hash(), the same in every process


def balanced_sample(labels: np.ndarray, size: int, seed: int = DEFAULT_SEED) -> np.ndarray:
    """Indices of ``size`` images, as equal a number per label as the counts allow, in a seeded random order."""
    labels = np.asarray(labels)
    if not 0 < size <= labels.size:
        raise ValueError(f"a family holds between 1 and {labels.size} images (the test set's size), not {size}")
    rng = np.random.default_rng([seed, _stable_key("sample")])
    classes = np.unique(labels)
    members = {int(c): np.flatnonzero(labels == c) for c in classes}
    quotas, remaining = {}, size
    # the rarest labels first, so that a label with too few images passes its share to the others
    for position, label in enumerate(sorted(members, key=lambda c: (members[c].size, c))):
        quotas[label] = min(members[label].size, -(-remaining // (len(members) - position)))
        remaining -= quotas[label]
    picked = np.concatenate([rng.choice(members[label], quotas[label], replace=False) for label in sorted(members)])
    return rng.permutation(picked).astype(np.int64)


def build_family(name: str, x_test: np.ndarray, y_test: np.ndarray, size: int = DEFAULT_SIZE, seed: int = DEFAULT_SEED) -> Family:
    """One family of ``size`` images rendered from a balanced sample of MNIST's test images.

    Every family of one seed draws the same sample, so families differ only by their change; an image
    depends only on (seed, family, test index), not on ``size``.
    """
    if name not in _SPECS:
        raise ValueError(f"unknown family {name!r}; the families are {', '.join(_SPECS)}")
    x_test = np.asarray(x_test)
    if x_test.ndim != 3 or x_test.shape[1:] != (SIDE, SIDE) or x_test.dtype != np.uint8:
        raise ValueError(f"expected MNIST test images as uint8 (n, 28, 28), got {x_test.dtype} {x_test.shape}")
    if len(x_test) != len(y_test):
        raise ValueError(f"{len(x_test)} images but {len(y_test)} labels")
    spec = _SPECS[name]
    indices = balanced_sample(np.asarray(y_test), size, seed)
    key = _stable_key(name)
    images = tuple(spec.render(x_test[i], np.random.default_rng([seed, key, int(i)])) for i in indices)
    labels = np.asarray(y_test)[indices].astype(np.int64)
    labels.setflags(write=False)
    indices.setflags(write=False)
    return Family(name, spec.description, spec.image_format, images, labels, indices)


def build_suite(
    x_test: np.ndarray,
    y_test: np.ndarray,
    size: int = DEFAULT_SIZE,
    seed: int = DEFAULT_SEED,
    names: Iterable[str] = FAMILY_NAMES,
) -> dict[str, Family]:
    """The named families (by default every one but the control), in order."""
    return {name: build_family(name, x_test, y_test, size, seed) for name in names}


def to_pixels(
    family: Family,
    normalise: Callable[[bytes], np.ndarray] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> NormalisedFamily:
    """Every image of a family through ``normalise`` (default: the service's ``image_bytes_to_mnist``).

    An image the normaliser refuses with ImageError is marked in ``refused`` rather than raised: the
    service would answer it with an error, so an evaluation counts it as a wrong answer.
    ``progress(done, total)`` is called every hundred images and at the end.
    """
    from pipeline.preprocess import ImageError, image_bytes_to_mnist

    normalise = normalise or image_bytes_to_mnist
    total = len(family.images)
    pixels = np.zeros((total, SIDE, SIDE), np.uint8)
    refused = np.zeros(total, bool)
    for i, data in enumerate(family.images):
        try:
            pixels[i] = normalise(data)
        except ImageError:
            refused[i] = True
        if progress is not None and ((i + 1) % 100 == 0 or i + 1 == total):
            progress(i + 1, total)
    return NormalisedFamily(pixels, refused)


def families_markdown(names: Iterable[str] = (CONTROL_NAME, *FAMILY_NAMES)) -> str:
    """A markdown table of the families and what each is, for the README."""
    lines = ["| family | format | what it is |", "|---|---|---|"]
    lines += [f"| `{name}` | {_SPECS[name].image_format} | {_SPECS[name].description} |" for name in names]
    return "\n".join(lines) + "\n"
