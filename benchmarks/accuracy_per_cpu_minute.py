"""Test accuracy per CPU-minute: our default training against the Keras reference CNN.

Run from the project folder:

    .venv/bin/python benchmarks/accuracy_per_cpu_minute.py [--seeds 42 43 44] [--points-per-epoch 4] [--quick]

Both configurations train in this one process, one after the other, on the same MNIST split:

* ``default``   -- exactly what the retraining flow does: ``pipeline.train.train(dataset, params)``
                  with ``params.yaml``, scored with ``compiled_predictor`` + ``predict_classes`` /
                  ``compute_metrics``.
* ``reference`` -- the Keras MNIST example CNN (conv32-pool-conv64-pool-dropout0.5-dense10, Adam
                  1e-3, batch 128, 34,826 parameters), fitted on the same 95 % of the training
                  images with the same 5 % validation hold-out, same seeding and determinism.

The test accuracy is measured at the end of every epoch by a callback (and ``--points-per-epoch``
times an epoch, if asked); the time spent measuring it is taken out of the clock, so
``(train seconds, test accuracy)`` pairs give "accuracy within 60 s" without a second run. Ratios
are against the reference trained with the same seed in the same run (the machine is noisy and
shared). Each final model is also scored on every family of the out-of-distribution suite
(``pipeline.suite``, ``--suite-size`` images a family, through the service's photo path; refused
images count as wrong). Nothing here asserts: it prints a table and writes JSON.

``--config`` adds exploration candidates defined below (see ``CANDIDATES``); ``--set`` overrides
``params.yaml`` keys for the ``default`` configuration (``--set train.epochs=12``).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml
from harness import RESULTS, ROOT, command_line, say, suite_accuracies, suite_families, table, write_results

from pipeline import evaluate
from pipeline import train as train_module
from pipeline.data import Dataset, has_dataset, ingest, load_dataset
from pipeline.params import Params, load_params

OUTPUT = RESULTS / "accuracy_per_cpu_minute.json"
BUDGET_SHORT_S = 60.0
BUDGET_LONG_S = 600.0
TARGET_SHORT = 0.990
TARGET_LONG = 0.995


@dataclass
class RunResult:
    config: str
    seed: int
    epochs: int
    batch_size: int
    parameters: int
    train_seconds: float  # wall time of the fit, per-epoch test scoring taken out
    images_per_second: float
    test_accuracy: float  # final model, via compiled_predictor + predict_classes + compute_metrics
    accuracy_at_60s: float | None  # test accuracy at the last scoring point with train time <= 60 s
    seconds_to_99_0: float | None
    seconds_to_99_5: float | None
    curve: list[tuple[float, float]] = field(default_factory=list)  # (train seconds, test accuracy)
    points_per_epoch: int = 1
    ratio_vs_reference: float | None = None
    families: dict[str, float] = field(default_factory=dict)  # accuracy per suite family, final model

    @property
    def suite_mean(self) -> float | None:
        return statistics.fmean(self.families.values()) if self.families else None


class TestCurve:
    """Test accuracy against training time at every epoch end (and ``points_per_epoch`` times an
    epoch), with its own scoring time excluded."""

    def __init__(self, dataset: Dataset, points_per_epoch: int = 1) -> None:
        self.points_per_epoch = points_per_epoch
        self.x_test = dataset.x_test
        self.y_test = dataset.y_test
        self.model = None
        self.started = 0.0
        self.scoring = 0.0
        self.points: list[tuple[float, float]] = []
        self._predict = None

    def start(self) -> None:
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started - self.scoring

    def record(self, epochs_done: float) -> None:
        at = self.elapsed()
        t0 = time.perf_counter()
        if self._predict is None:
            self._predict = train_module.compiled_predictor(self.model)
        with averaged_weights(self.model):
            _, predicted = evaluate.predict_classes(self._predict, self.x_test)
        accuracy = float(np.mean(predicted == self.y_test))
        self.points.append((round(at, 2), accuracy))
        self.scoring += time.perf_counter() - t0
        say(f"    epoch {epochs_done:5.2f}: {at:6.1f} s  test accuracy {accuracy:.2%}")

    def keras_callback(self):
        import keras

        curve = self

        class Record(keras.callbacks.Callback):
            def on_train_begin(self, logs: dict | None = None) -> None:
                curve.model = self.model
                curve.start()  # where train() starts its own clock: at the fit, after the build
                self.epoch = 0

            def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
                self.epoch = epoch

            def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
                steps = self.params.get("steps") or 0
                every = steps // curve.points_per_epoch if curve.points_per_epoch > 1 else 0
                if every and (batch + 1) % every == 0 and batch + 1 < steps - every // 2:  # the epoch end scores itself
                    curve.record(self.epoch + (batch + 1) / steps)

            def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
                curve.record(epoch + 1)

        return Record()


@contextmanager
def averaged_weights(model) -> Iterator[None]:
    """Score what ``fit`` would return if it stopped here: with weight averaging, the averaged weights.

    Training then goes on from exactly where it was: the swap's arithmetic (add, subtract) would leave
    rounding in the weights, and the run would drift from the flow's own.
    """
    import keras

    if not getattr(model.optimizer, "use_ema", False):
        yield
        return
    variables = [*model.trainable_variables, *model.optimizer.variables]
    saved = [variable.numpy() for variable in variables]
    swap = keras.callbacks.SwapEMAWeights()
    swap.set_model(model)
    swap.on_test_begin()
    try:
        yield
    finally:
        for variable, value in zip(variables, saved, strict=True):
            variable.assign(value)


def score(model, curve: TestCurve) -> float:
    """The flow's scoring: compiled predictor, predict_classes, compute_metrics."""
    _, predicted = evaluate.predict_classes(train_module.compiled_predictor(model), curve.x_test)
    return evaluate.compute_metrics(curve.y_test, predicted).accuracy


def summarise(
    config: str,
    seed: int,
    epochs: int,
    batch: int,
    model,
    n_images: int,
    curve: TestCurve,
    train_seconds: float,
    families: dict | None = None,
) -> RunResult:
    def first_reaching(target: float) -> float | None:
        return next((t for t, a in curve.points if a >= target), None)

    within = [a for t, a in curve.points if t <= BUDGET_SHORT_S]
    return RunResult(
        points_per_epoch=curve.points_per_epoch,
        config=config,
        seed=seed,
        epochs=epochs,
        batch_size=batch,
        parameters=int(model.count_params()),
        train_seconds=round(train_seconds, 2),
        images_per_second=round(n_images * epochs / train_seconds, 1),
        test_accuracy=score(model, curve),
        accuracy_at_60s=within[-1] if within else None,
        seconds_to_99_0=first_reaching(TARGET_SHORT),
        seconds_to_99_5=first_reaching(TARGET_LONG),
        curve=curve.points,
        families=suite_accuracies(train_module.compiled_predictor(model), families) if families else {},
    )


# ------------------------------------------------------------------ (a) the default, as the flow trains it


def run_default(
    dataset: Dataset, params: Params, seed: int, points_per_epoch: int = 1, name: str = "default", families: dict | None = None
) -> RunResult:
    params = params.model_copy(update={"train": params.train.model_copy(update={"seed": seed})})
    curve = TestCurve(dataset, points_per_epoch)
    result = train_module.train(dataset, params, callbacks=[curve.keras_callback()])
    train_seconds = result.seconds - curve.scoring
    n_fit = len(dataset.x_train) - int(round(len(dataset.x_train) * params.train.validation_split))
    return summarise(
        name,
        seed,
        params.train.epochs,
        params.train.batch_size,
        result.model,
        n_fit,
        curve,
        train_seconds,
        families,
    )


# ------------------------------------------------------------------ (b) the reference, and candidates


def reference_model(steps_per_epoch: int, epochs: int):
    """The Keras MNIST example ("Simple MNIST convnet"), 34,826 parameters."""
    import keras
    from keras import layers

    model = keras.Sequential(
        [
            keras.Input(shape=(28, 28, 1)),
            layers.Conv2D(32, kernel_size=(3, 3), activation="relu"),
            layers.MaxPooling2D(pool_size=(2, 2)),
            layers.Conv2D(64, kernel_size=(3, 3), activation="relu"),
            layers.MaxPooling2D(pool_size=(2, 2)),
            layers.Flatten(),
            layers.Dropout(0.5),
            layers.Dense(10, activation="softmax"),
        ],
        name="keras_reference",
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def candidate_model(
    steps_per_epoch: int,
    epochs: int,
    *,
    blocks: tuple[tuple[int, ...], ...] = ((32,), (64,)),
    dense: int = 128,
    dropout: float = 0.25,
    shift: float = 0.0,
    rotation: float = 0.0,
    zoom: float = 0.0,
    lr: float = 0.002,
    schedule: str = "cosine",
    warmup_share: float = 0.0,
):
    """An exploration net: blocks of (conv3x3-BN-relu)xk -> max-pool, optional augmentation layers
    (active only in training, so inference and serving are unchanged), dense, dropout, softmax."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=(28, 28, 1), name="pixels")
    x = inputs
    if shift:
        x = layers.RandomTranslation(shift, shift, fill_mode="constant")(x)
    if rotation:
        x = layers.RandomRotation(rotation, fill_mode="constant")(x)
    if zoom:
        x = layers.RandomZoom(zoom, fill_mode="constant")(x)
    for block in blocks:
        for filters in block:
            x = layers.Conv2D(filters, 3, use_bias=False, padding="same")(x)
            x = layers.BatchNormalization(momentum=0.9)(x)
            x = layers.ReLU()(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    if dense:
        x = layers.Dense(dense, activation="relu")(x)
    x = layers.Dropout(dropout)(x)
    outputs = layers.Dense(10, activation="softmax", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name="digits_cnn_candidate")
    total = max(1, steps_per_epoch * epochs)
    warmup = int(total * warmup_share)
    if schedule == "cosine":
        lr_schedule = keras.optimizers.schedules.CosineDecay(
            lr if not warmup else lr / 10,
            decay_steps=total - warmup,
            warmup_target=lr if warmup else None,
            warmup_steps=warmup,
        )
    else:
        lr_schedule = lr
    model.compile(optimizer=keras.optimizers.Adam(lr_schedule), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


@dataclass(frozen=True)
class Candidate:
    epochs: int
    batch_size: int
    build: Callable  # (steps_per_epoch, epochs) -> compiled keras.Model


def _cand(epochs: int, batch: int = 128, **kw) -> Candidate:
    return Candidate(epochs, batch, lambda steps, ep: candidate_model(steps, ep, **kw))


CANDIDATES: dict[str, Candidate] = {
    "reference": Candidate(15, 128, reference_model),
    # the default net, with training-time augmentation and a longer cosine schedule
    "aug-e15": _cand(15, shift=0.1, rotation=0.05),
    "aug-shift-e15": _cand(15, shift=0.1),
    "aug-shift-e20": _cand(20, shift=0.1),
    "aug-shift-e20-b256": _cand(20, 256, shift=0.1, lr=0.003),
    "aug-shift-e3": _cand(3, shift=0.1),
    "noaug-e3": _cand(3),
    "noaug-e2": _cand(2),  # the default net and schedule, fitted to a 60 s budget
    "noaug-e2-b64": _cand(2, 64, lr=0.002),
    "wide-aug-e15": _cand(15, blocks=((32,), (64,)), dense=256, dropout=0.4, shift=0.1),
    "deep-aug-e12": _cand(12, blocks=((32, 32), (64, 64)), dense=128, dropout=0.3, shift=0.1),
    "c3-aug-e8": _cand(8, blocks=((32,), (64,), (128,)), dense=128, dropout=0.3, shift=0.1),
    "c3-aug-e15": _cand(15, blocks=((32,), (64,), (128,)), dense=128, dropout=0.3, shift=0.1),
    "m3-aug-e15": _cand(15, blocks=((24,), (48,), (96,)), dense=128, dropout=0.3, shift=0.1),
    "s3-aug-e15": _cand(15, blocks=((16,), (32,), (64,)), dense=128, dropout=0.3, shift=0.1),
    "s3-aug-e15-b256": _cand(15, 256, blocks=((16,), (32,), (64,)), dense=128, dropout=0.3, shift=0.1, lr=0.003),
}


def run_keras(
    name: str,
    dataset: Dataset,
    params: Params,
    seed: int,
    epochs: int | None = None,
    points_per_epoch: int = 1,
    families: dict | None = None,
) -> RunResult:
    """Fit a model built here the way ``pipeline.train.train`` fits ours: same seeding, split, fit."""
    spec = CANDIDATES[name]
    epochs = epochs or spec.epochs
    train_module.seed_everything(seed)
    curve = TestCurve(dataset, points_per_epoch)
    x_fit, y_fit, x_val, y_val = train_module.split_for_validation(
        dataset.x_train, dataset.y_train, params.train.validation_split, seed
    )
    steps = int(np.ceil(len(x_fit) / spec.batch_size))
    model = spec.build(steps, epochs)
    started = time.perf_counter()
    model.fit(
        train_module.batches(x_fit, y_fit, spec.batch_size, shuffle_seed=seed),
        epochs=epochs,
        validation_data=train_module.batches(x_val, y_val, spec.batch_size) if len(x_val) else None,
        shuffle=False,  # the dataset reshuffles itself every epoch
        verbose=0,
        callbacks=[curve.keras_callback()],
    )
    train_seconds = time.perf_counter() - started - curve.scoring
    return summarise(name, seed, epochs, spec.batch_size, model, len(x_fit), curve, train_seconds, families)


# ------------------------------------------------------------------ report


def runs_table(results: list[RunResult]) -> str:
    columns = [("config", "<20"), ("seed", ">4"), ("epochs", ">6"), ("params", ">8,"), ("train s", ">8.1f"), ("img/s", ">7,.0f")]
    columns += [("test acc", ">8.2%"), ("acc@60s", ">8.2%"), ("s->99.0", ">7.0f"), ("s->99.5", ">7.0f"), ("time/ref", ">8")]
    columns += [("suite", ">6.2%")]
    names = list(dict.fromkeys(name for r in results for name in r.families))
    columns += [(name, f">{max(len(name), 5)}.3f") for name in names]
    rows = [
        (r.config, r.seed, r.epochs, r.parameters, r.train_seconds, r.images_per_second, r.test_accuracy, r.accuracy_at_60s)
        + (r.seconds_to_99_0, r.seconds_to_99_5, None if r.ratio_vs_reference is None else f"{r.ratio_vs_reference:.2f}x")
        + (r.suite_mean,)
        + tuple(r.families.get(name) for name in names)
        for r in results
    ]
    return table(columns, rows)


def aggregate(results: list[RunResult]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for config in dict.fromkeys(r.config for r in results):
        rs = [r for r in results if r.config == config]
        at60 = [r.accuracy_at_60s or 0.0 for r in rs]
        scored = all(r.families for r in rs)
        families = rs[0].families if scored else {}
        out[config] = {
            "runs": len(rs),
            "mean_test_accuracy": statistics.fmean(r.test_accuracy for r in rs),
            "mean_train_seconds": statistics.fmean(r.train_seconds for r in rs),
            "mean_images_per_second": statistics.fmean(r.images_per_second for r in rs),
            "mean_accuracy_at_60s": statistics.fmean(at60),
            "mean_suite_accuracy": statistics.fmean(r.suite_mean for r in rs) if scored else None,
            "mean_family_accuracy": {name: statistics.fmean(r.families[name] for r in rs) for name in families},
            "mean_time_ratio_vs_reference": (
                statistics.fmean(r.ratio_vs_reference for r in rs) if all(r.ratio_vs_reference is not None for r in rs) else None
            ),
            "meets_99_5_within_600s": statistics.fmean(r.test_accuracy for r in rs) >= TARGET_LONG
            and max(r.train_seconds for r in rs) <= BUDGET_LONG_S,
            "meets_99_0_within_60s": statistics.fmean(at60) >= TARGET_SHORT,
        }
    return out


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = yaml.safe_load(value)
    return out


def run_all(args, dataset: Dataset, params: Params, seeds: list[int], families: dict | None = None) -> list[RunResult]:
    """Every configuration for each seed, one after the other; times against the reference of the same seed."""
    results: list[RunResult] = []
    for seed in seeds:
        for config in args.config:
            if config == "default":
                r = run_default(dataset, params, seed, args.points_per_epoch, families=families)
            else:
                epochs = 1 if args.quick else (args.reference_epochs if config == "reference" else None)
                r = run_keras(config, dataset, params, seed, epochs, args.points_per_epoch, families)
            results.append(r)
            print(
                f"  {r.config} seed {r.seed}: {r.test_accuracy:.2%} in {r.train_seconds:.0f} s "
                f"({r.images_per_second:,.0f} img/s), suite mean {r.suite_mean or 0:.2%}  curve {r.curve}",
                flush=True,
            )
        ref = next((r for r in results if r.config == "reference" and r.seed == seed), None)
        for r in results:
            if r.seed == seed and ref is not None:
                r.ratio_vs_reference = round(r.train_seconds / ref.train_seconds, 3)
    return results


def print_summary(results: list[RunResult], summary: dict[str, dict], points_per_epoch: int) -> None:
    print(f"\n{runs_table(results)}\n")
    for config, s in summary.items():
        print(
            f"{config:<20} mean of {s['runs']}: test {s['mean_test_accuracy']:.2%} in {s['mean_train_seconds']:.0f} s"
            f" ({s['mean_images_per_second']:,.0f} img/s), acc@60s {s['mean_accuracy_at_60s']:.2%},"
            f" suite mean {s['mean_suite_accuracy'] or 0:.2%};"
            f" targets 99.5%/600s {'met' if s['meets_99_5_within_600s'] else 'not met'},"
            f" 99.0%/60s {'met' if s['meets_99_0_within_60s'] else 'not met'}"
        )
    print(
        f"({os.cpu_count()} shared CPU cores; times exclude the test scoring; acc@60s is the test accuracy at the last of"
        f" {points_per_epoch} scoring point(s) an epoch at or before 60 s of training)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = command_line(
        __doc__, OUTPUT, quick="smoke run: one seed, 1 epoch each, 10k training images (figures not comparable)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument(
        "--config", nargs="+", default=["default", "reference"], help=f"configurations to run: default, {', '.join(CANDIDATES)}"
    )
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="params.yaml overrides for 'default', e.g. train.epochs=12"
    )
    parser.add_argument(
        "--points-per-epoch",
        type=int,
        default=1,
        help="test-set scoring points per epoch (default 1: at each epoch end); 4 reads acc@60s off a finer curve",
    )
    parser.add_argument("--reference-epochs", type=int, default=None, help="epochs for the reference (the Keras example uses 15)")
    parser.add_argument("--suite-size", type=int, default=1000, help="images per suite family (0: no suite)")
    args = parser.parse_args(argv)

    os.chdir(ROOT)
    overrides = parse_set(args.set)
    seeds = args.seeds[:1] if args.quick else args.seeds
    if args.quick:
        overrides["train.epochs"] = 1
    params = load_params(Path("params.yaml"), overrides)
    if not has_dataset(Path("data")):
        ingest(params.data, Path("data"), Path(".cache"))
    dataset = load_dataset(Path("data"))
    if args.quick:
        dataset = dataset.head(10_000, None)

    size = min(args.suite_size, 100) if args.quick else args.suite_size
    families = suite_families(dataset.x_test, dataset.y_test, size) if size else None
    results = run_all(args, dataset, params, seeds, families)
    summary = aggregate(results)
    print_summary(results, summary, args.points_per_epoch)
    write_results(
        args.output,
        "accuracy_per_cpu_minute",
        quick=args.quick,
        params_overrides=overrides,
        targets={"accuracy_600s": TARGET_LONG, "accuracy_60s": TARGET_SHORT},
        runs=[asdict(r) for r in results],
        summary=summary,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
