"""Images/s classifying the 10,000 MNIST test images offline: every runtime of the model against ``model.predict``.

Run from the project folder:

    .venv/bin/python benchmarks/batch_inference.py [--repeats 5] [--quick]

Every way of running the same model over the same 10,000 uint8 test images, timed in this one process
(median of ``--repeats``, after one warm-up pass each), as images/s and as a ratio against the
baseline, Keras ``model.predict`` with its default batch of 32:

* ``model.predict(batch=32)`` and ``model.predict(batch=1000)``;
* ``predict_classes``: what the flow and the gate use (``pipeline.evaluate.predict_classes`` over
  ``pipeline.train.compiled_predictor``, 1,000 images a call, normalisation included);
* the compiled predictor alone on already-normalised input at several batch sizes;
* the service's runtimes, the model's TensorFlow Lite exports run by LiteRT (``pipeline.export``:
  XNNPACK kernels, slices of 16 images), with 1 thread (as the service runs) and with every core:
  float32, and int8 (calibrated on 500 training images, as the flow makes it). The flow keeps the int8
  export, and the service runs it, only when it gives the Keras model's digit on every test image.

Each method's digits are compared with ``model.predict``'s and its test accuracy is printed: a
speed means nothing without them. Beside each speed, the arithmetic rate it means (the model's
float32 operations an image, from its layers, times images/s), and, measured in the same run, the
rate of LiteRT's own float32 matrix multiply on 1 thread and on every core: what the target needs
of that ceiling says whether a float32 runtime could reach it at all.

The model is the project's champion when its store has one, otherwise the default architecture from
``params.yaml`` with untrained weights (the arithmetic, so the speed, does not depend on the weights;
the output says which). Nothing here asserts: it prints a table and writes JSON.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from harness import RESULTS, ROOT, command_line, say, table, write_results

from pipeline import evaluate
from pipeline.data import has_dataset, ingest, load_dataset
from pipeline.params import load_params
from pipeline.preprocess import to_model_input

OUTPUT = RESULTS / "batch_inference.json"
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
    model = build_model(params.model, params.train, steps_per_epoch=1)
    return model, "default architecture from params.yaml, untrained (no champion in the store)"


def forward_flops(model) -> int:
    """Floating-point operations of one image's forward pass: two per multiply-add of its conv and dense layers."""
    import keras

    multiply_adds = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, height, width, filters = layer.output.shape
            multiply_adds += height * width * filters * int(np.prod(layer.kernel_size)) * layer.input.shape[-1]
        elif isinstance(layer, keras.layers.Dense):
            multiply_adds += layer.input.shape[-1] * layer.units
    return 2 * multiply_adds


def matmul_ceiling(threads: int, repeats: int) -> float:
    """GFLOP/s of LiteRT's own float32 matrix multiply here (XNNPACK, as for the model), in the same run.

    256 rows a call through 512 x 512 weights (1 MB: they stay in the L2 cache), the fastest float32
    shape we found LiteRT running (benchmarks/README.md has the others tried).
    """
    import keras
    from ai_edge_litert.interpreter import Interpreter

    from pipeline.export import to_tflite

    width, rows, calls = 512, 256, 20
    probe = keras.Sequential([keras.Input((width,)), keras.layers.Dense(width, use_bias=False)])
    interpreter = Interpreter(model_content=to_tflite(probe), num_threads=threads)
    source = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(source, [rows, width])
    interpreter.allocate_tensors()
    interpreter.set_tensor(source, np.random.default_rng(0).random((rows, width), dtype=np.float32))

    def run() -> None:
        for _ in range(calls):
            interpreter.invoke()

    return 2 * calls * rows * width * width / timed(run, repeats) / 1e9


def timed(run: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``run`` after one warm-up call (tracing, thread pools, caches)."""
    run()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def methods_of(model, images: np.ndarray, train_images: np.ndarray) -> dict[str, Callable[[], object]]:
    """Every way of running ``model`` over ``images``, by name; the first is the baseline."""
    from pipeline.export import CALIBRATION_IMAGES, tflite_predictor, to_tflite
    from pipeline.train import compiled_predictor

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
    cores = os.cpu_count() or 1
    float32 = to_tflite(model)
    int8 = to_tflite(model, calibration=to_model_input(train_images[:CALIBRATION_IMAGES]))  # as the flow makes it
    runtimes = {
        "TFLite float32, 1 thread": tflite_predictor(float32, 1),
        f"TFLite float32, {cores} threads": tflite_predictor(float32, cores),
        "TFLite int8, 1 thread (the service)": tflite_predictor(int8, 1),
        f"TFLite int8, {cores} threads": tflite_predictor(int8, cores),
    }
    for name, lite in runtimes.items():
        methods[name] = lambda lite=lite: lite(normalised)
    return methods


def check_answers(methods: dict[str, Callable[[], object]], images: np.ndarray, labels: np.ndarray) -> dict[str, dict]:
    """Each method's digits against ``model.predict``'s, and its test accuracy: a speed means nothing without them."""
    answers = {}
    for name, run in methods.items():
        out = run()
        if name.startswith("predict_classes"):
            answers[name] = out[1]  # (probabilities, digits)
        else:
            answers[name] = (np.concatenate(out) if isinstance(out, list) else np.asarray(out)).argmax(axis=1)
    reference = answers["model.predict(batch=32)"]
    return {
        name: {
            "same_digit_as_model_predict": int((digits == reference).sum()),
            "test_accuracy": round(float((digits == labels[: len(images)]).mean()), 4),
        }
        for name, digits in answers.items()
    }


def print_report(rows: list[dict], model, which: str, flops: int, images: int, repeats: int, ceilings: dict) -> None:
    cores = os.cpu_count()
    print(
        f"\nmodel: {which} ({model.count_params():,} parameters, {flops / 1e6:.1f} MFLOP an image);"
        f" {images:,} test images; median of {repeats} passes; {cores} CPU cores"
    )
    columns = [("method", "<40"), ("seconds", ">8.3f"), ("images/s", ">9,"), ("vs predict", ">10"), ("GFLOP/s", ">8.1f")]
    columns += [("same digit", ">11,"), ("accuracy", ">9.2%")]
    keys = ("method", "seconds", "images_per_second", "ratio", "gflop_per_second", "same_digit_as_model_predict", "test_accuracy")
    print(table(columns, [[f"{r['ratio_vs_model_predict']:.2f}x" if k == "ratio" else r[k] for k in keys] for r in rows]))
    print("(GFLOP/s: the model's float32 operations per second; the int8 export does the same operations in 8-bit integers)")
    exact = [row for row in rows if row["same_digit_as_model_predict"] == images]
    for label, candidates in (("the same digit as model.predict on every image", exact), ("any", rows)):
        best = max(candidates, key=lambda row: row["images_per_second"])
        met = "met" if best["images_per_second"] >= TARGET_IMAGES_PER_SECOND else "not met"
        target = f"target {TARGET_IMAGES_PER_SECOND:,}: {met}"
        print(f"best, {label}: {best['method']} at {best['images_per_second']:,} images/s; {target}")
    needed = TARGET_IMAGES_PER_SECOND * flops / 1e9
    for threads, ceiling in ceilings.items():
        print(
            f"LiteRT float32 matrix multiply, {threads} thread(s): {ceiling:.1f} GFLOP/s, at most"
            f" {ceiling * 1e9 / flops:,.0f} images/s of this model; the target needs {needed:.1f} GFLOP/s"
            f" ({needed / ceiling:.0%} of it)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = command_line(__doc__, OUTPUT, quick="smoke run: 1 repeat, 2,000 images")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per method (median reported)")
    args = parser.parse_args(argv)

    os.chdir(ROOT)
    params = load_params(Path("params.yaml"))
    if not has_dataset(Path("data")):
        ingest(params.data, Path("data"), Path(".cache"))
    dataset = load_dataset(Path("data"))
    images = dataset.x_test[:2000] if args.quick else dataset.x_test
    repeats = 1 if args.quick else args.repeats

    model, which = champion_or_default(params)
    methods = methods_of(model, images, dataset.x_train)
    checks = check_answers(methods, images, dataset.y_test)
    flops = forward_flops(model)
    rows = []
    for name, run in methods.items():
        seconds = timed(run, repeats)
        rows.append(
            {"method": name, "seconds": round(seconds, 4), "images_per_second": round(len(images) / seconds), **checks[name]}
        )
        say(f"  {name:<36} {len(images) / seconds:>9,.0f} images/s")
    for row in rows:
        row["ratio_vs_model_predict"] = round(row["images_per_second"] / rows[0]["images_per_second"], 2)
        row["gflop_per_second"] = round(row["images_per_second"] * flops / 1e9, 1)
    # how close float32 can come to the target on these cores
    ceilings = {threads: round(matmul_ceiling(threads, repeats), 1) for threads in sorted({1, os.cpu_count() or 1})}
    print_report(rows, model, which, flops, len(images), repeats, ceilings)

    write_results(
        args.output,
        "batch_inference",
        model=which,
        parameters=int(model.count_params()),
        forward_flops=flops,
        images=len(images),
        repeats=repeats,
        quick=args.quick,
        target_images_per_second=TARGET_IMAGES_PER_SECOND,
        matmul_ceiling_gflop_per_second=ceilings,
        rows=rows,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
