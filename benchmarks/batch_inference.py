"""Benchmark 5 of issue 4: images/s classifying the 10,000 MNIST test images offline.

Run from the project folder:

    .venv/bin/python benchmarks/batch_inference.py [--repeats 5] [--quick]

Every way of running the same model over the same 10,000 uint8 test images, timed in this one process
(median of ``--repeats``, after one warm-up pass each), as images/s and as a ratio against the
baseline, Keras ``model.predict`` with its default batch of 32:

* ``model.predict(batch=32)`` and ``model.predict(batch=1000)``;
* ``predict_classes``: what the flow and the gate use (``pipeline.evaluate.predict_classes`` over
  ``pipeline.train.compiled_predictor``, 1,000 images a call, normalisation included);
* the compiled predictor alone on already-normalised input at several batch sizes;
* another runtime: the same model converted to TensorFlow Lite and run by its interpreter (XNNPACK
  kernels), checked to give the same digits; reported beside, not used by the flow or the service.

The model is the project's champion when its store has one, otherwise the default architecture from
``params.yaml`` with untrained weights (the arithmetic, so the speed, does not depend on the weights;
the output says which). Nothing here asserts: it prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from results_file import write_results  # noqa: E402

from pipeline import evaluate  # noqa: E402
from pipeline.data import has_dataset, ingest, load_dataset  # noqa: E402
from pipeline.params import load_params  # noqa: E402
from pipeline.preprocess import to_model_input  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "batch_inference.json"
TARGET_IMAGES_PER_SECOND = 15_000


def champion_or_default(params) -> tuple[object, str]:
    """The champion of the project's store if there is one, else the default net, untrained."""
    from pipeline import registry
    from pipeline.model import build_model
    from pipeline.settings import get_settings

    settings = get_settings()
    if settings.tracking_uri is None and not (settings.mlflow_dir / "mlflow.db").exists():
        champion = None  # do not create an empty store just to look
    else:
        champion = registry.get_alias(registry.connect(settings), settings.model_name)
    if champion is not None:
        return registry.load_keras(champion.uri), f"champion {settings.model_name} v{champion.version}"
    model = build_model(params.model, params.train.learning_rate, steps_per_epoch=1, epochs=1)
    return model, "default architecture from params.yaml, untrained (no champion in the store)"


def tflite_runner(model) -> Callable[[np.ndarray], np.ndarray] | None:
    """The model converted to TensorFlow Lite: a function of a normalised batch, or None if it cannot be."""
    import warnings

    import tensorflow as tf

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tf.lite's interpreter announces its move to the LiteRT package
            interpreter = tf.lite.Interpreter(
                model_content=tf.lite.TFLiteConverter.from_keras_model(model).convert(), num_threads=os.cpu_count()
            )
    except Exception as err:  # the converter's failures are many and version-specific: report, do not stop
        print(f"  TFLite conversion failed ({type(err).__name__}: {err}); skipping it", file=sys.stderr)
        return None
    source, target = interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]
    shape = [None]

    def run(x: np.ndarray) -> np.ndarray:
        if shape[0] != len(x):  # resizing re-plans the buffers: only when the batch size changes
            interpreter.resize_tensor_input(source, [len(x), 28, 28, 1])
            interpreter.allocate_tensors()
            shape[0] = len(x)
        interpreter.set_tensor(source, np.ascontiguousarray(x, dtype=np.float32))
        interpreter.invoke()
        return interpreter.get_tensor(target)

    return run


def timed(run: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``run`` after one warm-up call (tracing, thread pools, caches)."""
    run()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per method (median reported)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, 2,000 images")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    os.chdir(ROOT)
    params = load_params(Path("params.yaml"))
    if not has_dataset(Path("data")):
        ingest(params.data, Path("data"), Path(".cache"))
    dataset = load_dataset(Path("data"))
    images = dataset.x_test[:2000] if args.quick else dataset.x_test
    repeats = 1 if args.quick else args.repeats

    from pipeline.train import compiled_predictor

    model, which = champion_or_default(params)
    predict = compiled_predictor(model)
    normalised = to_model_input(images)
    methods: dict[str, Callable[[], object]] = {
        "model.predict(batch=32)": lambda: model.predict(normalised, verbose=0),
        "model.predict(batch=1000)": lambda: model.predict(normalised, batch_size=1000, verbose=0),
        "predict_classes (the flow's path)": lambda: evaluate.predict_classes(predict, images),
    }
    for batch in (256, 1000, 2500, 10_000):
        methods[f"compiled predictor, batch {batch}"] = lambda batch=batch: [
            predict(normalised[i : i + batch]) for i in range(0, len(normalised), batch)
        ]

    lite = tflite_runner(model)
    if lite is not None:
        for batch in (100, 1000):
            methods[f"TFLite interpreter, batch {batch}"] = lambda batch=batch: [
                lite(normalised[i : i + batch]) for i in range(0, len(normalised), batch)
            ]

    # every method must give the same answers, or its speed means nothing
    reference = model.predict(normalised, verbose=0).argmax(axis=1)
    _, flow_digits = evaluate.predict_classes(predict, images)
    agreement = float(np.mean(flow_digits == reference))
    lite_agreement = float(np.mean(lite(normalised).argmax(axis=1) == reference)) if lite is not None else None

    rows = []
    for name, run in methods.items():
        seconds = timed(run, repeats)
        rows.append({"method": name, "seconds": round(seconds, 4), "images_per_second": round(len(images) / seconds)})
        print(f"  {name:<36} {len(images) / seconds:>9,.0f} images/s", file=sys.stderr, flush=True)
    baseline = rows[0]["images_per_second"]
    for row in rows:
        row["ratio_vs_model_predict"] = round(row["images_per_second"] / baseline, 2)

    print(
        f"\nmodel: {which} ({model.count_params():,} parameters); {len(images):,} test images;"
        f" median of {repeats} passes; {os.cpu_count()} CPU cores"
    )
    print(f"{'method':<36} {'seconds':>8} {'images/s':>9} {'vs predict':>10}")
    print("-" * 66)
    for row in rows:
        print(f"{row['method']:<36} {row['seconds']:>8.3f} {row['images_per_second']:>9,} {row['ratio_vs_model_predict']:>9.2f}x")
    best = max(rows, key=lambda row: row["images_per_second"])
    flow_row = rows[2]
    print(
        f"\nthe flow's path: {flow_row['images_per_second']:,} images/s; best: {best['method']}"
        f" at {best['images_per_second']:,} images/s; target {TARGET_IMAGES_PER_SECOND:,}:"
        f" {'met' if best['images_per_second'] >= TARGET_IMAGES_PER_SECOND else 'not met'}"
    )
    print(f"predict_classes agrees with model.predict on {agreement:.2%} of the images", end="")
    print(f"; TFLite on {lite_agreement:.2%}" if lite_agreement is not None else "; TFLite unavailable")

    write_results(
        args.output,
        "batch_inference",
        model=which,
        parameters=int(model.count_params()),
        images=len(images),
        repeats=repeats,
        quick=args.quick,
        agreement_with_model_predict=agreement,
        tflite_agreement_with_model_predict=lite_agreement,
        target_images_per_second=TARGET_IMAGES_PER_SECOND,
        rows=rows,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
