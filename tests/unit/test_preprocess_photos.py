"""Photos of digits on paper become MNIST-style digits; images without a digit are refused.

Every photo is rendered here: real MNIST test digits (or strokes drawn with Pillow) "printed" on a
paper texture with what phone photos bring: ruled lines, uneven light, a shadow, the table beyond
the sheet's edge, blue ink, pencil, a marker, JPEG.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from pipeline.preprocess import BOX, SIDE, ImageError, NotADigitError, image_bytes_to_mnist, to_mnist
from pipeline.suite import build_family, to_pixels

BLACK_INK = (25, 25, 30)
BLUE_INK = (30, 50, 170)
PENCIL = (120, 120, 125)


# ---------------------------------------------------------------- rendering


def _paper(height: int, width: int, seed: int, tone: float = 228.0) -> np.ndarray:
    """Float RGB paper with a little grain."""
    rng = np.random.default_rng(seed)
    grain = rng.normal(0.0, 3.0, (height, width, 1))
    return np.clip(np.full((height, width, 3), tone) + grain, 0, 255)


def _print(paper: np.ndarray, coverage: np.ndarray, top: int, left: int, ink: tuple[int, int, int]) -> np.ndarray:
    """Lay ink of colour ``ink`` on the paper where ``coverage`` (0-1) says, its top-left corner at (top, left)."""
    out = paper.copy()
    h, w = coverage.shape
    alpha = coverage[..., None]
    region = out[top : top + h, left : left + w]
    out[top : top + h, left : left + w] = region * (1 - alpha) + np.asarray(ink, float) * alpha
    return out


def _mnist_coverage(pixels: np.ndarray, size: int) -> np.ndarray:
    """An MNIST digit (white on black) scaled up to ``size`` pixels as ink coverage 0-1."""
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC), float) / 255.0


def _ruled(photo: np.ndarray, spacing: int, colour=(150, 170, 215)) -> np.ndarray:
    """Blue ruled lines across the whole sheet, slightly tilted as in a photo taken by hand."""
    out = photo.copy()
    height, width, _ = out.shape
    for start in range(spacing // 2, height, spacing):
        for x in range(width):
            y = int(start + 0.02 * x)
            if 0 <= y < height - 1:
                out[y : y + 2, x] = out[y : y + 2, x] * 0.35 + np.asarray(colour) * 0.65
    return out


def _light(photo: np.ndarray, darkest: float = 0.55, shadow: bool = True) -> np.ndarray:
    """A light gradient across the page and, optionally, a soft shadow over one corner."""
    height, width, _ = photo.shape
    y, x = np.mgrid[0:height, 0:width]
    field = darkest + (1 - darkest) * (x / width * 0.6 + y / height * 0.4)
    if shadow:
        edge = (x + y - 0.9 * (height + width) / 2) / 12.0
        field = field * (0.6 + 0.4 / (1 + np.exp(edge)))  # a hand or phone shades the lower right
    return photo * field[..., None]


def _jpeg(photo: np.ndarray, quality: int = 80, blur: float = 0.8) -> bytes:
    image = Image.fromarray(np.clip(np.rint(photo), 0, 255).astype(np.uint8), "RGB")
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _strokes(lines: list[list[tuple[float, float]]], size: int, width: int) -> np.ndarray:
    """Polylines (in 0-1 coordinates of a size x size square) drawn as ink coverage 0-1, anti-aliased."""
    scale = 4  # draw large and shrink: Pillow's lines are not anti-aliased
    canvas = Image.new("L", (size * scale, size * scale), 0)
    draw = ImageDraw.Draw(canvas)
    for line in lines:
        points = [(x * size * scale, y * size * scale) for x, y in line]
        draw.line(points, fill=255, width=width * scale, joint="curve")
        for px, py in (points[0], points[-1]):
            r = width * scale / 2
            draw.ellipse((px - r, py - r, px + r, py + r), fill=255)
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), float) / 255.0


FOUR_TWO_STROKES = [[(0.55, 0.05), (0.15, 0.6), (0.85, 0.6)], [(0.7, 0.3), (0.7, 0.95)]]


# ---------------------------------------------------------------- what a good result looks like


def _old_to_mnist(gray: np.ndarray) -> np.ndarray:
    """The framing before photos were handled (contrast stretch, 0.2 cut), for digits that are already clean."""
    ink = gray.astype(np.float32) / max(float(gray.max()), 1.0)
    ink[ink < 0.2] = 0
    rows, cols = np.nonzero(ink)
    crop = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    scale = BOX / max(crop.shape)
    height, width = max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))
    small = Image.fromarray((crop * 255).astype(np.uint8)).resize((width, height), Image.Resampling.LANCZOS)
    digit = np.asarray(small, dtype=np.float32)
    cy = np.arange(height) @ digit.sum(1) / digit.sum()
    cx = np.arange(width) @ digit.sum(0) / digit.sum()
    top = int(np.clip(round(SIDE / 2 - 0.5 - cy), 0, SIDE - height))
    left = int(np.clip(round(SIDE / 2 - 0.5 - cx), 0, SIDE - width))
    frame = np.zeros((SIDE, SIDE), dtype=np.float32)
    frame[top : top + height, left : left + width] = digit
    return np.clip(np.rint(frame), 0, 255).astype(np.uint8)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(float).ravel(), b.astype(float).ravel())[0, 1])


def _assert_like_clean(outputs: list[np.ndarray], cleans: list[np.ndarray]) -> None:
    """Photos read like the clean digits: strongly correlated on average; thin digits pay more for a pixel of shift."""
    correlations = [_correlation(a, b) for a, b in zip(outputs, cleans, strict=True)]
    assert np.mean(correlations) > 0.8 and min(correlations) > 0.6, correlations


def _assert_mnist_framed(digit: np.ndarray) -> None:
    """A 28x28 uint8 digit: white strokes on black, the longer side ~20 px, centred by mass, grey edges."""
    assert digit.shape == (SIDE, SIDE) and digit.dtype == np.uint8
    rows, cols = np.nonzero(digit > 30)
    longer = max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
    assert BOX - 2 <= longer <= BOX + 1, f"the ink spans {longer} px, not the {BOX} px box"
    mass = digit.astype(float)
    cy = (np.arange(SIDE) @ mass.sum(1)) / mass.sum()
    cx = (np.arange(SIDE) @ mass.sum(0)) / mass.sum()
    assert abs(cy - 13.5) < 1.5 and abs(cx - 13.5) < 1.5, (cy, cx)
    assert digit.max() >= 240, "the strokes' cores are white"
    greys = np.count_nonzero((digit > 20) & (digit < 230))
    assert greys >= 10, "stroke edges are grey (anti-aliased), not binary"
    # no ruled line or sheet edge runs across the frame
    assert (digit > 30).sum(axis=1).max() <= 22 and (digit > 30).sum(axis=0).max() <= 22


@pytest.fixture(scope="module")
def digits(mnist_slice) -> list[np.ndarray]:
    """Six MNIST test digits of different classes."""
    x, y = mnist_slice.x_test, mnist_slice.y_test
    return [x[np.flatnonzero(y == label)[0]] for label in (0, 2, 3, 5, 7, 8)]


# ---------------------------------------------------------------- photos


def _notebook_photo(pixels: np.ndarray, seed: int, ink=BLACK_INK) -> bytes:
    """A 360x300 photo of a digit on ruled paper, under a gradient and a shadow, as JPEG."""
    paper = _ruled(_paper(360, 300, seed), spacing=26)
    photo = _print(paper, _mnist_coverage(pixels, 150), top=90, left=70, ink=ink)
    return _jpeg(_light(photo))


def test_digit_on_ruled_paper_under_a_shadow_matches_the_clean_digit(digits):
    outputs = [image_bytes_to_mnist(_notebook_photo(pixels, seed)) for seed, pixels in enumerate(digits)]
    for digit in outputs:
        _assert_mnist_framed(digit)
    _assert_like_clean(outputs, [to_mnist(pixels) for pixels in digits])


def test_blue_ballpoint_reads_like_black_ink(digits):
    outputs = [image_bytes_to_mnist(_notebook_photo(pixels, seed, ink=BLUE_INK)) for seed, pixels in enumerate(digits)]
    for digit in outputs:
        _assert_mnist_framed(digit)
    _assert_like_clean(outputs, [to_mnist(pixels) for pixels in digits])


def test_sheet_edge_with_a_dark_table_beyond_it_is_ignored(digits):
    outputs = []
    for seed, pixels in enumerate(digits):
        table = np.full((400, 400, 3), (70.0, 50.0, 40.0)) + np.random.default_rng(seed).normal(0, 6, (400, 400, 1))
        sheet = _print(_paper(300, 290, seed), _mnist_coverage(pixels, 140), top=90, left=80, ink=BLACK_INK)
        table[40:340, 110:400] = sheet  # the sheet runs off the right and bottom; the table shows top and left
        outputs.append(image_bytes_to_mnist(_jpeg(_light(table, darkest=0.7, shadow=False))))
        _assert_mnist_framed(outputs[-1])
    _assert_like_clean(outputs, [to_mnist(pixels) for pixels in digits])


def test_a_four_in_two_strokes_keeps_both(digits):
    two = _strokes(FOUR_TWO_STROKES, 120, width=9)
    one = _strokes([[(0.55, 0.05), (0.15, 0.6), (0.85, 0.6)], [(0.7, 0.3), (0.7, 0.6)], [(0.7, 0.6), (0.7, 0.95)]], 120, 9)
    photo = _print(_ruled(_paper(300, 260, 1), spacing=24), two, top=80, left=70, ink=BLUE_INK)
    digit = image_bytes_to_mnist(_jpeg(_light(photo)))
    _assert_mnist_framed(digit)
    # the vertical stroke is kept: ink on both sides of the crossing, and the whole 4 is there
    assert _correlation(digit, to_mnist(255 - np.rint(one * 255).astype(np.uint8))) > 0.85


def test_thin_pencil_is_found():
    seven = _strokes([[(0.1, 0.1), (0.85, 0.1), (0.4, 0.95)]], 160, width=3)
    photo = _print(_paper(320, 320, 3), seven * 0.7, top=80, left=90, ink=PENCIL)
    digit = image_bytes_to_mnist(_jpeg(_light(photo, darkest=0.7), blur=0.5))
    _assert_mnist_framed(digit)
    clean = to_mnist(255 - np.rint(seven * 255).astype(np.uint8))
    # strokes widened to MNIST's width are still thin: compare them with a pixel of tolerance
    blurred = [np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(1))) for a in (digit, clean)]
    assert _correlation(*blurred) > 0.8


def test_a_thin_one_filling_the_frame_is_not_taken_for_a_margin_line():
    one = np.full((240, 120), 235, np.uint8)
    one[15:225, 59:61] = 40  # a fine pen's 1, cropped tightly
    digit = to_mnist(one)
    rows, cols = np.nonzero(digit > 30)
    assert rows.max() - rows.min() + 1 >= BOX - 1 and 2 <= cols.max() - cols.min() + 1 <= 4


def test_thick_marker_keeps_its_stroke_filled():
    zero = np.zeros((200, 200))
    yy, xx = np.mgrid[0:200, 0:200]
    ring = np.hypot((yy - 100) / 85, (xx - 100) / 60)
    zero[(ring > 0.62) & (ring < 1.0)] = 1.0  # a marker's 0: strokes about a fifth of the digit's width
    photo = _print(_paper(280, 260, 4), zero, top=40, left=30, ink=BLACK_INK)
    digit = image_bytes_to_mnist(_jpeg(_light(photo, darkest=0.6)))
    _assert_mnist_framed(digit)
    assert digit[11:17, 13:15].max() < 60, "the 0's hole stays open"
    clean = to_mnist(255 - np.rint(zero * 255).astype(np.uint8))
    assert _correlation(digit, clean) > 0.85


def test_white_chalk_on_a_blackboard(digits):
    outputs = []
    for seed, pixels in enumerate(digits):
        board = np.full((300, 340, 3), (40.0, 62.0, 52.0)) + np.random.default_rng(seed).normal(0, 4, (300, 340, 1))
        photo = _print(board, _mnist_coverage(pixels, 160) * 0.85, top=60, left=90, ink=(225, 228, 220))
        outputs.append(image_bytes_to_mnist(_jpeg(_light(photo, darkest=0.65, shadow=False))))
        _assert_mnist_framed(outputs[-1])
    _assert_like_clean(outputs, [to_mnist(pixels) for pixels in digits])


def test_white_on_black_and_black_on_white_drawings_are_read_alike(digits):
    for pixels in digits:
        white_on_black = np.asarray(Image.fromarray(pixels).resize((280, 280), Image.Resampling.BICUBIC))
        a = image_bytes_to_mnist(_png(white_on_black))
        b = image_bytes_to_mnist(_png(255 - white_on_black))
        _assert_mnist_framed(a)
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
        assert _correlation(a, _old_to_mnist(white_on_black)) > 0.95  # drawings are framed as before


def test_mnist_digits_at_their_own_size_are_framed_exactly_as_the_old_path_framed_them(mnist_slice):
    """Plain MNIST digits take the clean-drawing path: none is refused, and each comes out as it did before photos."""
    for index, pixels in enumerate(mnist_slice.x_test):
        assert np.array_equal(to_mnist(pixels), _old_to_mnist(pixels)), f"test digit {index} is framed differently"


@pytest.mark.parametrize("name", ["scaled", "thick", "low_contrast", "noisy"])
def test_suite_digits_a_user_really_sends_are_not_refused(mnist_slice, name):
    """A tight crop, a marker, faint ink on grey paper, a noisy scan: each still shows one digit."""
    family = build_family(name, mnist_slice.x_test, mnist_slice.y_test, size=30, seed=0)
    refused = to_pixels(family).refused
    assert not refused.any(), f"{name}: images {np.flatnonzero(refused).tolist()} refused"


def test_a_large_jpeg_is_decoded_reduced_and_still_read(digits):
    coverage = _mnist_coverage(digits[1], 700)
    photo = _print(_paper(1500, 2000, 5), coverage, top=400, left=650, ink=BLUE_INK)
    digit = image_bytes_to_mnist(_jpeg(_light(photo), blur=0))
    _assert_mnist_framed(digit)
    assert _correlation(digit, _old_to_mnist(np.rint(coverage * 255))) > 0.75


# ---------------------------------------------------------------- not a digit


@pytest.mark.parametrize(
    ("name", "photo", "message"),
    [
        ("blank white page", lambda: np.full((300, 240), 250.0), "no digit found: the image is one flat tone"),
        ("blank photo under a gradient", lambda: _light(_paper(300, 300, 7)), "no digit found"),
        ("all-black drawing", lambda: np.zeros((28, 28)), "no digit found: the image is one flat tone"),
        ("empty ruled page", lambda: _light(_ruled(_paper(300, 300, 8), 24)), "no digit found"),
        ("uniform noise", lambda: np.random.default_rng(9).uniform(0, 255, (200, 200)), "not a digit"),
        (
            "ink all over",
            lambda: np.where(np.random.default_rng(10).uniform(size=(240, 240)) < 0.2, 30.0, 230.0),
            "not a digit",
        ),
        (
            "scribbles edge to edge",
            lambda: 255 - 230 * _strokes([[(0.0, 0.1), (1.0, 0.5), (0.0, 0.9)], [(0.5, 0.0), (0.5, 1.0)]], 240, 6),
            "not a digit: the ink spreads over the whole image",
        ),
    ],
)
def test_images_without_a_digit_are_refused_with_a_reason(name, photo, message):
    with pytest.raises(NotADigitError, match=message) as raised:
        image_bytes_to_mnist(_png(photo()))
    assert isinstance(raised.value, ImageError)
    assert "send" in str(raised.value), "the message says what to send instead"


def test_squared_paper_and_specks_are_dropped(digits):
    outputs = []
    for seed, pixels in enumerate(digits):
        rng = np.random.default_rng(seed)
        paper = _paper(320, 320, seed)
        for at in range(10, 320, 22):  # squared paper: lines both ways
            paper[at : at + 2, :] = paper[at : at + 2, :] * 0.4 + np.asarray((140.0, 160.0, 200.0)) * 0.6
            paper[:, at : at + 2] = paper[:, at : at + 2] * 0.4 + np.asarray((140.0, 160.0, 200.0)) * 0.6
        photo = _print(paper, _mnist_coverage(pixels, 150), top=85, left=85, ink=BLACK_INK)
        for y, x in rng.integers(5, 315, (25, 2)):  # crumbs and dust
            if not (70 < y < 250 and 70 < x < 250):
                photo[y : y + 2, x : x + 2] = 40.0
        outputs.append(image_bytes_to_mnist(_jpeg(_light(photo, shadow=False))))
        _assert_mnist_framed(outputs[-1])
    _assert_like_clean(outputs, [to_mnist(pixels) for pixels in digits])


def test_a_photo_taken_at_a_slant_is_read(digits):
    """Slight perspective: the ruled lines converge and tilt, the digit is a little foreshortened."""
    outputs = []
    for seed, pixels in enumerate(digits):
        paper = _ruled(_paper(360, 320, seed), spacing=24)
        photo = _print(paper, _mnist_coverage(pixels, 150), top=100, left=85, ink=BLUE_INK)
        image = Image.fromarray(np.clip(np.rint(_light(photo)), 0, 255).astype(np.uint8), "RGB")
        # output (x, y) <- input ((a x + b y + c) / (g x + h y + 1), (d x + e y + f) / (g x + h y + 1))
        slanted = image.transform(image.size, Image.Transform.PERSPECTIVE, (1.0, 0.06, -10, 0.02, 1.0, -8, 0.0002, 0.0003))
        outputs.append(image_bytes_to_mnist(_jpeg(np.asarray(slanted, dtype=float))))
        _assert_mnist_framed(outputs[-1])
    _assert_like_clean(outputs, [to_mnist(pixels) for pixels in digits])
