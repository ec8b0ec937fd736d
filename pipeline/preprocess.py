"""One preprocessing path for training, evaluation and serving, so they cannot drift apart.

A photo or drawing becomes an MNIST-style digit: grayscale, white ink on black, cropped to the
ink, scaled into a 20x20 box and centred by its centre of mass in a 28x28 frame.

Photos get there through the same steps as clean drawings: the paper's own brightness (uneven
light, a shadow) is estimated and divided out, ink is separated from paper by a threshold that
adapts to the image, and only the digit's strokes are kept (not ruled lines, specks, the sheet's
edge or the table beyond it). An image without a digit raises ``NotADigitError``.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

SIDE = 28
BOX = 20
# the copy on which ink is found: large enough for thin strokes, small enough to cost milliseconds
WORK_SIDE = 320
# a JPEG is decoded at 1/2, 1/4 or 1/8 scale while it stays at least this large on its longer side
DECODE_SIDE = 2 * WORK_SIDE
# a digit photo needs no more; larger files are refused from their header, before they are decoded
MAX_SIDE = 8192
# pixels decoded in full: a phone photo (4:3 at about 16 MP) fits; a JPEG counts at the scale it is decoded at
MAX_PIXELS = 4096 * 4096
MAX_BYTES = 20 * 1024 * 1024
ORIENTATION = ExifTags.Base.Orientation
REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "CMYK", "I", "F")
# the only decoders an upload reaches (Pillow would otherwise try each of its plugins, PostScript included)
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
ACCEPTED = "a PNG, JPEG, WebP, BMP, GIF or TIFF image"
# other kinds of file people send, named in the refusal
_OTHER_FORMATS = {
    b"%!PS": "PostScript (EPS)",
    b"\xc5\xd0\xd3\xc6": "PostScript (EPS)",
    b"%PDF": "PDF",
    b"<svg": "SVG",
    b"<?xm": "XML (SVG?)",
    b"\x00\x00\x01\x00": "ICO",
    b"8BPS": "Photoshop (PSD)",
}


class ImageError(ValueError):
    """An input that cannot be read as a digit image; the message says what was wrong."""


class NotADigitError(ImageError):
    """A readable image that shows no single digit (blank, noise, ink all over); the message says what was seen."""


def decode_image(data: bytes) -> Image.Image:
    """Decode PNG, JPEG, WebP, BMP, GIF or TIFF bytes, refusing empty, huge, broken and other files.

    Only those formats' decoders run. The size is checked from the header before anything is decoded.
    An image much larger than the digit needs is reduced while it is decoded (a JPEG at 1/2, 1/4 or 1/8
    of its size) or right after (the others, by whole factors), down to about ``DECODE_SIDE``.
    """
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    if len(data) > MAX_BYTES:
        raise ImageError(f"the image is {len(data):,} bytes; the limit is {MAX_BYTES:,}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            _check_sides(image.width, image.height)
            _decode_reduced(image)
            _check_pixels(image.width, image.height, image.format)
            image.load()
            image = _reduced(image)
    except UnidentifiedImageError:
        raise ImageError(_unidentified(data)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"not a readable image: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:
        if isinstance(err, ImageError):
            raise
        raise ImageError(f"the image is corrupt or truncated: {err}") from None
    return image


def _decode_reduced(image: Image.Image) -> None:
    """Let a large JPEG decode at a fraction of its size: ink is found on a small copy anyway, and a phone photo
    decoded in full costs more than everything else on the path."""
    longest = max(image.size)
    if image.format == "JPEG" and longest > 2 * DECODE_SIDE:
        scale = DECODE_SIDE / longest
        image.draft(image.mode, (max(1, int(image.width * scale)), max(1, int(image.height * scale))))


def _reduced(image: Image.Image) -> Image.Image:
    """A decoded image much larger than the digit needs, reduced by a whole factor (box average) to at least
    ``DECODE_SIDE`` on its longer side, as a JPEG is while decoding: the later steps then cost the same for
    every format."""
    factor = max(image.size) // DECODE_SIDE
    if factor < 2:
        return image
    if image.mode not in REDUCIBLE_MODES:  # a palette's indices or single bits cannot be averaged
        image = image.convert("RGBA" if _has_alpha(image) else "RGB" if image.mode in ("P", "PA") else "L")
    if image.getexif().get(ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)  # a TIFF's orientation tag would not survive the reduction
    return image.reduce(factor)


def _has_alpha(image: Image.Image) -> bool:
    return image.mode == "PA" or "transparency" in image.info


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
    """Why Pillow could not identify a file: another format, or a 0-pixel image (which Pillow refuses without saying so)."""
    size = declared_size(data)
    if size is not None and min(size) < 1:
        return f"the image is {size[0]}x{size[1]} pixels; it needs at least 1x1"
    head = data[:4]
    other = _OTHER_FORMATS.get(head) or ("HEIC/AVIF" if data[4:8] == b"ftyp" else None)
    if other is not None:
        return f"{other} files are not accepted: send {ACCEPTED} (convert it first)"
    return f"not a readable image: the data is not {ACCEPTED} (its first bytes are {data[:12]!r})"


def _check_sides(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ImageError(f"the image is {width}x{height} pixels; it needs at least 1x1")
    if width > MAX_SIDE or height > MAX_SIDE:
        raise ImageError(
            f"the image is {width}x{height} pixels; the limit is {MAX_SIDE} on a side "
            f"and {MAX_PIXELS:,} in all (scale it down first)"
        )


def _check_pixels(width: int, height: int, fmt: str | None) -> None:
    """The pixels that would be decoded (a JPEG's after its reduction) against MAX_PIXELS, before decoding."""
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"the {fmt or 'image'} would decode to {width}x{height} pixels; the limit is {MAX_PIXELS:,} "
            f"(about a 16-megapixel photo) and {MAX_SIDE} on a side: scale it down first"
        )


def to_grayscale(image: Image.Image) -> np.ndarray:
    """A uint8 2-D array; transparent pixels count as background (white).

    Colour images take their darkest channel at each pixel, so coloured ink (a blue ballpoint, a red
    pen) stays as dark as black ink against white paper; for grey pixels this is their grey level.
    """
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("L", "1", "I", "I;16", "F"):
        return np.asarray(image.convert("L"), dtype=np.uint8)
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])  # far faster than rgb.min(axis=2)


def to_mnist(gray: np.ndarray) -> np.ndarray:
    """Normalise a grayscale digit of any size and polarity to a 28x28 uint8 MNIST-style image.

    Raises ``NotADigitError`` for an image that shows no digit: blank, noise, or ink all over.
    """
    gray = np.asarray(gray)
    if gray.ndim != 2 or gray.size == 0:
        raise ImageError(f"expected a 2-D grayscale image, got shape {gray.shape}")
    if gray.dtype != np.uint8:
        gray = np.clip(np.rint(np.asarray(gray, dtype=np.float32)), 0, 255).astype(np.uint8)
    if max(gray.shape) <= SMALL_SIDE:
        drawing, gray = _small_drawing(gray)
        if drawing is not None:
            return _simple_frame(drawing)
    work, scale = _working_copy(gray)
    dark_ink, background, ink = _read_polarity(work)
    paper = gray if dark_ink else 255 - gray
    mask = _ink_mask(ink)
    try:
        digit = _digit_components(mask)
    except NotADigitError:
        # a dark table or shadow along the edge can set the threshold above the digit's ink: find ink again without it
        beyond = _along_the_edge(mask)
        if not beyond.any():
            raise
        digit = _digit_components(_ink_mask(np.where(beyond, 0.0, ink)))
    return _mnist_frame(paper, background, digit, scale)


def image_bytes_to_mnist(data: bytes) -> np.ndarray:
    """Bytes of an uploaded photo or drawing -> a 28x28 uint8 MNIST-style digit."""
    return to_mnist(to_grayscale(decode_image(data)))


# ---------------------------------------------------------------- the steps of to_mnist

# ink must be at least this much darker than the paper around it (as a fraction of the paper's brightness)
MIN_INK_CONTRAST = 0.12
# below this range of grey levels the image is one flat tone
MIN_TONE_RANGE = 12
# a digit's ink covers a small part of the frame; more than this is texture or noise
MAX_INK_SHARE = 0.35
# relative to a stroke's core, ink fainter than this is blur or paper grain (the cut the first MNIST-style path made)
HALO = 0.2
# MNIST's strokes are about this many pixels wide in the 28x28 frame; thinner ones are widened to it
MIN_STROKE = 1.5
# a "digit" whose box spans this much of both sides of the frame is ink spread all over
MAX_DIGIT_SPAN = 0.92


# a drawing up to this size on a flat background needs none of the photo steps (MNIST, a canvas export, a scan)
SMALL_SIDE = 128
# the ink of a drawing is anything further from the background than this share of the strongest ink
CUT = 0.2
# in a clean drawing nearly all the paper away from the strokes sits on the background's exact tone; JPEG or noise spread it
MIN_FLAT_SHARE = 0.95
# how far (as a share of the image's longer side) a stroke's soft edge may reach into the paper
EDGE_REACH = 0.06
# an isolated pixel or two of full-strength ink is salt noise, not a stroke; a clean drawing has almost none
MAX_SPECKS = 2
# a small image whose pixels a 3x3 median changes strongly in more than this share is noisy, not merely compressed
NOISE_SHARE = 0.05


def _small_drawing(gray: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """A small image's ink if it is a clean drawing, perhaps once salt noise is filtered out; else the image for the
    photo steps, median-filtered if it is speckled (the photo steps would take the specks for ink all over)."""
    import cv2

    drawing = _clean_drawing_ink(gray)
    if drawing is not None or min(gray.shape) < 3:
        return drawing, gray
    smoothed = cv2.medianBlur(gray, 3)
    drawing = _clean_drawing_ink(smoothed)
    if drawing is not None:
        return drawing, smoothed
    low, high = np.percentile(gray, [1, 99])
    changed = np.abs(gray.astype(np.int16) - smoothed.astype(np.int16)) > 0.25 * max(float(high - low), 1.0)
    return None, smoothed if changed.mean() > NOISE_SHARE else gray


def _clean_drawing_ink(gray: np.ndarray) -> np.ndarray | None:
    """A small drawing's ink (float, 0 on the background) when its background is one flat tone; None for anything else.

    The background is the frame's median tone (as the first MNIST-style path read it) and ink is whichever
    side of it the strokes lie on, so grey ink on grey paper reads as well as white on black.
    """
    import cv2

    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = int(np.median(border))
    signed = gray.astype(np.int16) - background
    distance = np.abs(signed)
    strongest = int(distance.max())
    if strongest < MIN_TONE_RANGE:
        return None
    ink = (distance > CUT * strongest).astype(np.uint8)
    # a stroke's soft edge (anti-aliasing, an enlarged drawing's blur) is not judged: only the paper away from it
    reach = max(1, round(EDGE_REACH * max(gray.shape)))
    away = cv2.dilate(ink, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * reach + 1, 2 * reach + 1))) == 0
    if np.count_nonzero(away & (distance <= 2)) < MIN_FLAT_SHARE * max(np.count_nonzero(away), 1):
        return None
    count, labels, stats, _ = cv2.connectedComponentsWithStats(ink, connectivity=8)
    peaks = np.zeros(count, dtype=np.int16)
    np.maximum.at(peaks, labels.ravel(), distance.ravel())
    specks = (stats[:, cv2.CC_STAT_AREA] <= 2) & (peaks >= strongest // 2)
    if np.count_nonzero(specks[1:]) > MAX_SPECKS:
        return None
    dark_ink = np.count_nonzero(signed < -2) > np.count_nonzero(signed > 2)
    # written so that white on black (background 0) and black on white (255) give the first path's values exactly
    return np.float32(background) - gray.astype(np.float32) if dark_ink else gray.astype(np.float32) - np.float32(background)


def _simple_frame(ink: np.ndarray) -> np.ndarray:
    """The first MNIST-style framing of a clean drawing's ink: contrast stretch, the cut, crop, 20x20 box, centre of mass."""
    low, high = np.percentile(ink, 5), ink.max()
    ink = np.clip((ink - low) / (high - low), 0, 1)
    ink[ink < CUT] = 0
    rows, cols = np.nonzero(ink)
    crop = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    scale = BOX / max(crop.shape)
    height, width = max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))
    small = Image.fromarray((crop * 255).astype(np.uint8)).resize((width, height), Image.Resampling.LANCZOS)
    return _centred(np.asarray(small, dtype=np.float32))


def _centred(digit_box: np.ndarray) -> np.ndarray:
    """The digit's box pasted into the 28x28 frame so that its centre of mass lands in the middle."""
    height, width = digit_box.shape
    total = digit_box.sum()
    cy, cx = (
        (np.arange(height) @ digit_box.sum(1) / total, np.arange(width) @ digit_box.sum(0) / total)
        if total > 0
        else ((height - 1) / 2, (width - 1) / 2)
    )
    top = int(np.clip(round(SIDE / 2 - 0.5 - cy), 0, SIDE - height))
    left = int(np.clip(round(SIDE / 2 - 0.5 - cx), 0, SIDE - width))
    frame = np.zeros((SIDE, SIDE), dtype=np.float32)
    frame[top : top + height, left : left + width] = digit_box
    return np.clip(np.rint(frame), 0, 255).astype(np.uint8)


def _read_polarity(work: np.ndarray) -> tuple[bool, np.ndarray, np.ndarray]:
    """Whether the ink is darker than the paper (a pen) or lighter (chalk, a white-on-black canvas), with the
    paper's background and the ink's strength on the working copy read that way.

    Ink is the minority: read the wrong way, paper between strokes or ruled lines turns into "ink" over
    a large share of the image. Where neither reading finds much, ink lies in the longer tail of the
    grey levels beyond the median. The frame's edge cannot decide: a dark table beyond the sheet may fill it.
    """
    low, median, high = np.percentile(work, [0.1, 50, 99.9])
    if high - low < MIN_TONE_RANGE:
        raise NotADigitError(
            f"no digit found: the image is one flat tone (grey levels {int(low)}-{int(high)}); "
            "send a photo or drawing of one digit, dark on light or light on dark"
        )
    readings = []
    for paper in (work, 255 - work):
        background = _paper_background(paper)
        readings.append((background, _ink_strength(paper, background)))
    dark_share, light_share = (float(np.mean(ink > MIN_INK_CONTRAST)) for _, ink in readings)
    if max(dark_share, light_share) >= 0.05 and abs(dark_share - light_share) > 0.01:
        dark_ink = dark_share < light_share
    else:  # neither reading floods the image: the wrong one may just miss the ink, so it cannot decide
        dark_ink = bool(median - low >= high - median)
    background, ink = readings[0 if dark_ink else 1]
    return dark_ink, background, ink


def _working_copy(gray: np.ndarray) -> tuple[np.ndarray, float]:
    """The image scaled so its longer side is WORK_SIDE, and that scale: ink is found at one known size."""
    import cv2

    scale = WORK_SIDE / max(gray.shape)
    size = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(gray, size, interpolation=interpolation), scale


def _paper_background(work: np.ndarray) -> np.ndarray:
    """The brightness the paper would have without ink: a closing wider than any stroke removes the strokes.

    A closing keeps the steps of a shadow or of the sheet's edge where they are, where a blur would smear them.
    """
    import cv2

    side = max(3, (max(work.shape) // 3) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (side, side))
    return cv2.morphologyEx(work, cv2.MORPH_CLOSE, kernel, borderType=cv2.BORDER_REPLICATE)


def _ink_strength(paper: np.ndarray, background: np.ndarray) -> np.ndarray:
    """How much darker than its paper each pixel is, 0 (paper) to 1 (black): light and shadow divide out."""
    floor = 16.0  # a nearly black "paper" would turn sensor noise into ink
    return np.clip(1.0 - paper.astype(np.float32) / np.maximum(background.astype(np.float32), floor), 0.0, 1.0)


def _ink_mask(ink: np.ndarray) -> np.ndarray:
    """Pixels of ink: Otsu's threshold (never below MIN_INK_CONTRAST), plus fainter pixels touching them.

    Ruled lines are taken out first, so that a faint line cannot join the digit.
    """
    import cv2

    strength = np.rint(np.clip(ink - _line_strength(ink), 0.0, 1.0) * 255).astype(np.uint8)
    # the paper's own level (grain and sensor noise lift it a little above 0) is where ink starts
    paper_level = int(np.searchsorted(np.cumsum(np.bincount(strength.ravel(), minlength=256)), strength.size / 2))
    strength = cv2.GaussianBlur(cv2.subtract(strength, paper_level), (3, 3), 0)
    if strength.max() < MIN_INK_CONTRAST * 255:
        raise NotADigitError(
            "no digit found: the image shows paper without ink (nothing is darker than the paper around it "
            f"by {MIN_INK_CONTRAST:.0%} or more); send a photo or drawing of one digit"
        )
    otsu, _ = cv2.threshold(strength, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    strong_level = max(otsu, MIN_INK_CONTRAST * 255)
    weak = strength > max(strong_level / 2, MIN_INK_CONTRAST * 255 / 2)
    if weak.mean() > MAX_INK_SHARE and not _one_dominant_region(weak):
        raise NotADigitError(
            f"not a digit: ink-like texture covers {weak.mean():.0%} of the image (noise, a pattern or a dark "
            "photo); send a photo or drawing of one digit on plain paper"
        )
    strong = weak & (strength > strong_level)
    # hysteresis: a pencil stroke's faint edges count where they touch its dark core; a region that is
    # mostly faint (the soft edge of a shadow, a crease) is not ink even where a few pixels are dark enough
    count, labels = cv2.connectedComponents(weak.astype(np.uint8), connectivity=8)
    strong_pixels = np.bincount(labels[strong], minlength=count)
    keep = strong_pixels >= 0.25 * np.bincount(labels.ravel(), minlength=count)
    keep[0] = False
    return keep[labels]


def _one_dominant_region(ink: np.ndarray) -> bool:
    """Whether most of the ink forms one connected region: a bold or tightly cropped digit, not scattered texture."""
    import cv2

    count, _, stats, _ = cv2.connectedComponentsWithStats(ink.astype(np.uint8), connectivity=8)
    return count > 1 and stats[1:, cv2.CC_STAT_AREA].max() >= 0.5 * np.count_nonzero(ink)


def _line_strength(ink: np.ndarray) -> np.ndarray:
    """How much of each pixel's ink belongs to a ruled or grid line: thin, and running across most of the frame.

    Only thin structures count (a stroke's thick core is not a line), and they are widened across the
    line's direction first, so that a slightly tilted line still forms one long run.
    """
    import cv2

    # in 8 bits: OpenCV's long morphological runs are several times faster on bytes than on floats
    levels = np.rint(ink * 255).astype(np.uint8)
    thin = cv2.subtract(levels, cv2.morphologyEx(levels, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8)))
    height, width = ink.shape
    response = np.zeros_like(levels)
    for horizontal in (True, False):
        run = max(3, int(0.45 * (width if horizontal else height)))
        spread = cv2.dilate(thin, np.ones((7, 1) if horizontal else (1, 7), np.uint8))
        along = np.ones((1, run) if horizontal else (run, 1), np.uint8)
        lines = cv2.morphologyEx(spread, cv2.MORPH_OPEN, along)
        if not horizontal:
            lines = _reaching_top_or_bottom(lines)
        response = np.maximum(response, lines)
    return response.astype(np.float32) / 255


def _reaching_top_or_bottom(lines: np.ndarray) -> np.ndarray:
    """Only the vertical lines that run out of the frame: a thin 1 filling a tight crop has paper above or below it."""
    import cv2

    count, labels = cv2.connectedComponents((lines > 0).astype(np.uint8), connectivity=8)
    reaching = np.zeros(count, dtype=bool)
    reaching[np.unique(labels[0])] = True
    reaching[np.unique(labels[-1])] = True
    reaching[0] = False
    return np.where(reaching[labels], lines, 0).astype(lines.dtype)


def _touches_border_widely(stats_row: np.ndarray, labels: np.ndarray, label: int) -> bool:
    """A region that runs along the frame's edge: the table beyond the sheet, the sheet's own edge, a shadow."""
    import cv2

    left, top = stats_row[cv2.CC_STAT_LEFT], stats_row[cv2.CC_STAT_TOP]
    right, bottom = left + stats_row[cv2.CC_STAT_WIDTH], top + stats_row[cv2.CC_STAT_HEIGHT]
    height, width = labels.shape
    if left > 0 and top > 0 and right < width and bottom < height:
        return False
    contact = max(
        np.count_nonzero(labels[0] == label),
        np.count_nonzero(labels[-1] == label),
        np.count_nonzero(labels[:, 0] == label) * width / height,
        np.count_nonzero(labels[:, -1] == label) * width / height,
    )
    return contact >= 0.2 * width


def _along_the_edge(mask: np.ndarray) -> np.ndarray:
    """The ink regions that run along the frame's edge (the table, the sheet's edge, a shadow), slightly widened."""
    import cv2

    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    along = np.zeros(count, dtype=bool)
    along[1:] = [_touches_border_widely(stats[label], labels, label) for label in range(1, count)]
    return cv2.dilate(along[labels].astype(np.uint8), np.ones((5, 5), np.uint8)) > 0


def _touches_border(stats_row: np.ndarray, shape: tuple[int, int]) -> bool:
    left, top, right, bottom = _box(stats_row)
    return left == 0 or top == 0 or right == shape[1] or bottom == shape[0]


def _is_solid_blob(stats_row: np.ndarray) -> bool:
    """Mostly filled and not elongated: a shadow's corner or a fingertip, where strokes leave their box mostly empty."""
    left, top, right, bottom = _box(stats_row)
    width, height = right - left, bottom - top
    filled = stats_row[4] / (width * height)
    return filled >= 0.5 and max(width, height) < 3 * min(width, height)


def _could_be_a_digit(stats_row: np.ndarray, shape: tuple[int, int]) -> bool:
    """Large enough to be seen as a digit, and not a dash: no digit is much wider than it is tall."""
    left, top, right, bottom = _box(stats_row)
    width, height = right - left, bottom - top
    return height >= 0.05 * max(shape) and width <= 3 * height


def _digit_components(mask: np.ndarray) -> np.ndarray:
    """The digit's strokes: the largest plausible component and the parts close to it (a two-stroke 4 or 5)."""
    import cv2

    height, width = mask.shape
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    candidates = [
        label
        for label in range(1, count)
        if stats[label, cv2.CC_STAT_AREA] >= 4
        and not _touches_border_widely(stats[label], labels, label)
        and not (_touches_border(stats[label], (height, width)) and _is_solid_blob(stats[label]))
    ]
    if len(candidates) > 150:
        raise NotADigitError(
            f"not a digit: the image holds {len(candidates)} separate specks of ink (noise or texture); "
            "send a photo or drawing of one digit on plain paper"
        )
    areas = stats[:, cv2.CC_STAT_AREA]
    plausible = [label for label in candidates if _could_be_a_digit(stats[label], (height, width))]
    if not plausible:
        raise NotADigitError(
            "no digit found: the image shows paper, lines, edges or specks but no stroke of ink large enough "
            "for a digit; send a photo or drawing of one digit"
        )
    # in a photo the digit rarely touches the frame, while what is cut off by it (a shadow's corner) does
    inside = [label for label in plausible if not _touches_border(stats[label], (height, width))]
    main = max(inside or plausible, key=lambda label: areas[label])
    box = _box(stats[main])
    chosen = {main}
    # grow the digit by parts near its box, again and again: the bar of a 5, the second stroke of a 4
    grown = True
    while grown:
        grown = False
        reach = 0.25 * max(box[2] - box[0], box[3] - box[1])
        for label in candidates:
            if label in chosen or areas[label] < 0.005 * areas[main]:
                continue
            other = _box(stats[label])
            gap_x = max(other[0] - box[2], box[0] - other[2], 0)
            gap_y = max(other[1] - box[3], box[1] - other[3], 0)
            if max(gap_x, gap_y) <= reach:
                chosen.add(label)
                box = (min(box[0], other[0]), min(box[1], other[1]), max(box[2], other[2]), max(box[3], other[3]))
                grown = True
    if box[2] - box[0] >= MAX_DIGIT_SPAN * width and box[3] - box[1] >= MAX_DIGIT_SPAN * height:
        raise NotADigitError(
            "not a digit: the ink spreads over the whole image, edge to edge; "
            "send one digit with some plain paper around it (crop the photo to the digit)"
        )
    keep = np.zeros(count, dtype=bool)
    keep[list(chosen)] = True
    return keep[labels]


def _box(stats_row: np.ndarray) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a component, right and bottom exclusive."""
    left, top, width, height = (int(v) for v in stats_row[:4])
    return left, top, left + width, top + height


def _mnist_frame(paper: np.ndarray, background: np.ndarray, digit: np.ndarray, scale: float) -> np.ndarray:
    """Crop the digit from the full-resolution image, scale it into the 20x20 box and centre it by mass.

    The strokes keep their grey, anti-aliased edges: the output is the ink's strength inside a slightly
    widened mask of the digit, not the binary mask.
    """
    import cv2

    rows, cols = np.nonzero(digit)
    # the digit's box in the full image, one work pixel wider on each side for the stroke edges
    top = max(0, int((rows.min() - 1) / scale))
    bottom = min(paper.shape[0], int(np.ceil((rows.max() + 2) / scale)))
    left = max(0, int((cols.min() - 1) / scale))
    right = min(paper.shape[1], int(np.ceil((cols.max() + 2) / scale)))
    crop_size = (right - left, bottom - top)
    widened = cv2.dilate(digit.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
    full_size = (paper.shape[1], paper.shape[0])
    if scale < 1:
        # upsample only the crop's share of the work-sized background and mask
        box = (left * scale, top * scale, right * scale, bottom * scale)
        crop_background = _resize_region(background, box, crop_size, cv2.INTER_LINEAR)
        crop_mask = _resize_region(widened.astype(np.float32), box, crop_size, cv2.INTER_LINEAR) > 0.05
    else:
        crop_background = cv2.resize(background, full_size, interpolation=cv2.INTER_AREA)[top:bottom, left:right]
        crop_mask = cv2.resize(widened.astype(np.float32), full_size, interpolation=cv2.INTER_AREA)[top:bottom, left:right] > 0.05
    ink = _ink_strength(paper[top:bottom, left:right], crop_background) * crop_mask
    # the strokes' cores reach full white as in MNIST; the faint halo that blur and JPEG leave around them drops out
    core = np.percentile(ink[ink > 0], 95) if np.any(ink > 0) else 1.0
    ink = np.clip(ink / max(core, 1e-3), 0.0, 1.0)
    ink[ink < HALO] = 0.0
    rows, cols = np.nonzero(ink)
    if rows.size == 0:
        raise NotADigitError("no digit found: the strokes are too faint; send a darker photo or drawing of one digit")
    ink = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    # scale the longer side to BOX, keeping the aspect ratio
    ink = _thickened(ink, MIN_STROKE * max(ink.shape) / BOX)
    box_scale = BOX / max(ink.shape)
    # a box narrower than MNIST's stroke could not hold one (the single stroke of a 1)
    narrowest = int(np.ceil(MIN_STROKE))
    height, width = (max(narrowest, round(side * box_scale)) for side in ink.shape)
    interpolation = cv2.INTER_AREA if box_scale < 1 else cv2.INTER_CUBIC
    digit_box = np.clip(cv2.resize(ink * 255, (width, height), interpolation=interpolation), 0, 255)
    return _centred(digit_box)


def _thickened(ink: np.ndarray, min_width: float) -> np.ndarray:
    """Strokes widened to at least ``min_width`` pixels: a pencil line would otherwise fade to a grey hair in 20x20."""
    import cv2

    solid = (ink >= 0.5).astype(np.uint8)
    edge = np.count_nonzero(solid - cv2.erode(solid, np.ones((3, 3), np.uint8)))
    width = 2 * np.count_nonzero(solid) / max(edge, 1)  # a stroke of length L and width w: area wL, edge about 2L
    grow = int(round(min_width - width))
    if grow < 1:
        return ink
    # room to grow at the crop's edges: a 1's single stroke fills its crop from side to side
    margin = (grow + 1) // 2
    padded = np.pad(ink, margin)
    return cv2.dilate(padded, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (grow + 1, grow + 1)))


def _resize_region(
    image: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int], interpolation: int
) -> np.ndarray:
    """The part of ``image`` inside ``box`` (left, top, right, bottom, in its pixels, fractional) resampled to ``size``."""
    import cv2

    left, top, right, bottom = box
    # an affine map from output pixel centres to input coordinates
    sx, sy = (right - left) / size[0], (bottom - top) / size[1]
    matrix = np.array([[sx, 0, left + 0.5 * sx - 0.5], [0, sy, top + 0.5 * sy - 0.5]], dtype=np.float64)
    return cv2.warpAffine(image, matrix, size, flags=interpolation | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 (n, 28, 28) pixels -> the float32 (n, 28, 28, 1) tensor in [0, 1] the CNN takes."""
    images = np.asarray(images)
    if images.ndim == 2:
        images = images[None]
    if images.shape[1:] != (SIDE, SIDE):
        raise ImageError(f"expected images of shape (n, 28, 28), got {images.shape}")
    return (images.astype(np.float32) / 255.0)[..., None]
