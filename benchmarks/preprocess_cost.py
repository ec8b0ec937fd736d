"""Time per photo of the photo path (``pipeline.preprocess.image_bytes_to_mnist``) against the path it replaced.

Run from the project folder:

    .venv/bin/python benchmarks/preprocess_cost.py [--repeats 200] [--quick]

Two JPEG photos rendered here, 300x300 and 4000x3000 (a phone's 12 MP): a digit in dark ink on ruled
paper under a light gradient and a shadow. Each goes from its bytes to a 28x28 digit through both
paths in this one process, the two alternating call by call so that both see the same machine:

* the baseline, ``old_to_mnist`` (the normalisation before photos were handled, copied here: polarity
  from the border, a contrast stretch at the 5th percentile, a 0.2 cut, crop, 20x20 box, centre of
  mass) after a full decode and Pillow's grayscale conversion, as the service did;
* the new path, ``image_bytes_to_mnist``: a large JPEG decoded at a reduced scale, the background
  divided out on a small working copy, ruled lines and stray components dropped, the digit cropped
  from the full-resolution image.

Reported: p50 and p99 of the wall time per photo, and the ratio new / old of each. The first call of
the new path in a process also imports OpenCV; that one call is timed separately. Nothing here
asserts: it prints a table and writes JSON.
"""

from __future__ import annotations

import io
import time

import numpy as np
from harness import RESULTS, command_line, say, table, write_results
from PIL import Image, ImageDraw, ImageOps

OUTPUT = RESULTS / "preprocess_cost.json"
SIDE, BOX = 28, 20


def old_to_mnist(gray: np.ndarray) -> np.ndarray:
    """The normalisation before photos were handled, kept as it was: the baseline."""
    gray = np.asarray(gray, dtype=np.float32)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    ink = 255.0 - gray if np.median(border) > 127 else gray
    low, high = np.percentile(ink, 5), ink.max()
    if high - low < 1:
        return np.zeros((SIDE, SIDE), dtype=np.uint8)
    ink = np.clip((ink - low) / (high - low), 0, 1)
    ink[ink < 0.2] = 0
    rows, cols = np.nonzero(ink)
    if rows.size == 0:
        return np.zeros((SIDE, SIDE), dtype=np.uint8)
    crop = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    scale = BOX / max(crop.shape)
    height, width = max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))
    small = Image.fromarray((crop * 255).astype(np.uint8)).resize((width, height), Image.Resampling.LANCZOS)
    digit = np.asarray(small, dtype=np.float32)
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


def old_image_bytes_to_mnist(data: bytes) -> np.ndarray:
    """The old path from bytes: a full decode, Pillow's luminance, ``old_to_mnist``."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return old_to_mnist(np.asarray(ImageOps.exif_transpose(image).convert("L"), dtype=np.uint8))


def photo_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """A 3 in dark ink on ruled paper, under a light gradient and a shadow, as a JPEG of quality 85."""
    rng = np.random.default_rng(seed)
    paper = Image.new("L", (width, height), 228)
    draw = ImageDraw.Draw(paper)
    unit = min(width, height)
    for y in range(unit // 12, height, unit // 12):  # ruled lines, slightly tilted
        draw.line([(0, y), (width, y + unit // 60)], fill=170, width=max(1, unit // 300))
    stroke = max(2, unit // 30)
    cx, cy, r = width / 2, height / 2, unit / 8
    draw.arc([cx - r, cy - 2 * r, cx + r, cy], start=180, end=90, fill=30, width=stroke)
    draw.arc([cx - r, cy, cx + r, cy + 2 * r], start=270, end=160, fill=30, width=stroke)
    pixels = np.asarray(paper, dtype=np.float32)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    light = 0.6 + 0.4 * (x / width * 0.6 + y / height * 0.4)
    light *= 0.65 + 0.35 / (1 + np.exp((x + y - 1.1 * (width + height) / 2) / (unit / 40)))
    pixels = pixels * light + rng.normal(0, 3, pixels.shape).astype(np.float32)
    buffer = io.BytesIO()
    rgb = np.repeat(np.clip(pixels, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def percentiles_ms(seconds: list[float]) -> tuple[float, float]:
    p50, p99 = np.percentile(np.asarray(seconds) * 1000, [50, 99])
    return float(p50), float(p99)


def main(argv: list[str] | None = None) -> int:
    parser = command_line(__doc__, OUTPUT, quick="smoke run: 10 calls per photo and path")
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per path for the small photo")
    parser.add_argument("--large-repeats", type=int, default=30, help="timed calls per path for the 12 MP photo")
    args = parser.parse_args(argv)
    small_repeats, large_repeats = (10, 10) if args.quick else (args.repeats, args.large_repeats)

    say("rendering the photos")
    photos = {"300x300": photo_jpeg(300, 300), "4000x3000": photo_jpeg(4000, 3000)}

    start = time.perf_counter()
    from pipeline.preprocess import image_bytes_to_mnist

    image_bytes_to_mnist(photos["300x300"])
    first_call_ms = (time.perf_counter() - start) * 1000
    say(f"first call of the new path (imports OpenCV): {first_call_ms:.0f} ms")

    rows, figures = [], {}
    for name, data in photos.items():
        repeats = small_repeats if name == "300x300" else large_repeats
        say(f"{name}: {len(data):,} bytes, {repeats} calls per path")
        old_to_mnist_times, new_times = [], []
        old_image_bytes_to_mnist(data), image_bytes_to_mnist(data)  # warm caches
        for _ in range(repeats):
            for path, times in ((old_image_bytes_to_mnist, old_to_mnist_times), (image_bytes_to_mnist, new_times)):
                start = time.perf_counter()
                path(data)
                times.append(time.perf_counter() - start)
        old_p50, old_p99 = percentiles_ms(old_to_mnist_times)
        new_p50, new_p99 = percentiles_ms(new_times)
        rows.append((name, old_p50, old_p99, new_p50, new_p99, new_p50 / old_p50, new_p99 / old_p99))
        figures[name] = {
            "bytes": len(data),
            "calls": repeats,
            "old_ms": {"p50": old_p50, "p99": old_p99},
            "new_ms": {"p50": new_p50, "p99": new_p99},
            "ratio_new_to_old": {"p50": new_p50 / old_p50, "p99": new_p99 / old_p99},
        }

    print(
        table(
            [
                ("photo", "<10"),
                ("old p50 ms", ">11.1f"),
                ("old p99 ms", ">11.1f"),
                ("new p50 ms", ">11.1f"),
                ("new p99 ms", ">11.1f"),
                ("p50 new/old", ">12.2f"),
                ("p99 new/old", ">12.2f"),
            ],
            rows,
        )
    )
    print(f"first call of the new path in a process (imports OpenCV): {first_call_ms:.0f} ms")
    write_results(args.output, "preprocess_cost", quick=args.quick, first_call_ms=first_call_ms, photos=figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
