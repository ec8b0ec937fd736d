"""The out-of-distribution suite's cost, and how much of each family today's photo path brings back.

Run from the project folder:

    .venv/bin/python benchmarks/suite_cost.py [--size 1000] [--seed 0] [--quick]

For every family of ``pipeline.suite`` (and the clean control), in this one process: the time to build
it from MNIST's 10,000 test images (wall and CPU), its mean image size in bytes, and the time to
normalise every image through the service's photo path (``image_bytes_to_mnist``).

Beside the cost, a check of usefulness, not of a model: the share of a family's images that come
back from the photo path looking like the clean digit, i.e. whose normalised 28x28 image correlates
above 0.7 with ``to_mnist`` of the untouched test image. A geometric family (rotated, sheared,
elastic) scores low by design, since its digit is meant to differ; for the others a low share means
the preprocessing loses the digit. Images the path refuses count as not alike. Nothing here asserts.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from harness import RESULTS, ROOT, command_line, say, table, write_results

from pipeline import suite
from pipeline.data import ingest, load_dataset
from pipeline.params import load_params
from pipeline.preprocess import ImageError, to_mnist

ALIKE = 0.7


def mnist_test() -> tuple[np.ndarray, np.ndarray]:
    """MNIST's test split, ingested by the project's own code from its configured source (cached in .cache/)."""
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "data"
        ingest(load_params(ROOT / "params.yaml").data, data, ROOT / ".cache")
        dataset = load_dataset(data)
        return dataset.x_test.copy(), dataset.y_test.copy()


def reference(digit: np.ndarray) -> np.ndarray:
    """The clean digit as the photo path frames it; the digit itself where the path refuses it (MNIST is framed already)."""
    try:
        return to_mnist(digit)
    except ImageError:
        return digit


def correlations(normalised: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """Pearson correlation of each pair of images; 0 where either image is flat."""
    a = normalised.reshape(len(normalised), -1).astype(np.float64)
    b = clean.reshape(len(clean), -1).astype(np.float64)
    a -= a.mean(axis=1, keepdims=True)
    b -= b.mean(axis=1, keepdims=True)
    norms = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    return np.divide((a * b).sum(axis=1), norms, out=np.zeros(len(a)), where=norms > 0)


def main() -> None:
    parser = command_line(__doc__, RESULTS / "suite_cost.json", "100 images a family: a smoke run")
    parser.add_argument("--size", type=int, default=suite.DEFAULT_SIZE, help="images a family (default %(default)s)")
    parser.add_argument("--seed", type=int, default=suite.DEFAULT_SEED)
    args = parser.parse_args()
    size = 100 if args.quick else args.size

    x_test, y_test = mnist_test()
    rows, figures = [], {}
    for name in (suite.CONTROL_NAME, *suite.FAMILY_NAMES):
        wall, cpu = time.perf_counter(), time.process_time()
        family = suite.build_family(name, x_test, y_test, size, args.seed)
        build_wall, build_cpu = time.perf_counter() - wall, time.process_time() - cpu
        wall, cpu = time.perf_counter(), time.process_time()
        normalised = suite.to_pixels(family)
        normalise_wall, normalise_cpu = time.perf_counter() - wall, time.process_time() - cpu
        clean = np.stack([reference(x_test[i]) for i in family.source_indices])
        alike = (correlations(normalised.pixels, clean) > ALIKE) & ~normalised.refused
        figures[name] = {
            "images": len(family),
            "format": family.image_format,
            "mean_bytes": float(np.mean([len(data) for data in family.images])),
            "build_s": build_wall,
            "build_cpu_s": build_cpu,
            "normalise_s": normalise_wall,
            "normalise_cpu_s": normalise_cpu,
            "refused": int(normalised.refused.sum()),
            "alike_share": float(alike.mean()),
        }
        rows.append(
            (
                name,
                family.image_format,
                f"{figures[name]['mean_bytes']:,.0f}",
                f"{build_wall:.2f} ({build_cpu:.2f})",
                f"{normalise_wall:.2f} ({normalise_cpu:.2f})",
                f"{1000 * normalise_wall / len(family):.2f}",
                figures[name]["refused"],
                f"{100 * alike.mean():.1f} %",
            )
        )
        say(f"{name}: built in {build_wall:.2f} s, normalised in {normalise_wall:.2f} s")
    families = [figures[name] for name in suite.FAMILY_NAMES]
    total_build = sum(f["build_s"] for f in families)
    total_normalise = sum(f["normalise_s"] for f in families)
    columns = [
        ("family", "<13"),
        ("format", "<6"),
        ("bytes/image", ">11"),
        ("build s (CPU)", ">13"),
        ("normalise s (CPU)", ">17"),
        ("normalise ms/image", ">18"),
        ("refused", ">7"),
        (f"alike (r > {ALIKE})", ">14"),
    ]
    print(table(columns, rows))
    print(
        f"\n{len(families)} families of {size}: built in {total_build:.1f} s "
        f"({sum(f['build_cpu_s'] for f in families):.1f} s CPU), normalised in {total_normalise:.1f} s"
    )
    write_results(
        args.output,
        "suite_cost",
        size=size,
        seed=args.seed,
        families=figures,
        total_build_s=total_build,
        total_normalise_s=total_normalise,
    )


if __name__ == "__main__":
    main()
