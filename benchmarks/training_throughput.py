"""Training throughput of our training step against a bare ``model.fit`` of the same net.

Run from the project folder:

    .venv/bin/python benchmarks/training_throughput.py [--epochs 2] [--rounds 2] [--quick]

In this one process, alternating so that drift on a shared machine hits both alike
(bare, bare+val, ours, bare, bare+val, ours, ...):

* ``bare``: the default net (``pipeline.model.build_model`` from ``params.yaml``) and a plain
  ``model.fit`` on the same 57,000 training images, already normalised float32 arrays in memory:
  no validation, no tracking, one callback that reads the clock at each epoch's begin and end;
* ``bare+val``: the same, and Keras validates the same 3,000 held-out images every epoch
  (``validation_data`` arrays), as our step does: ours against it is what tracking and the input
  pipeline cost, the validation being alike;
* ``ours``: the retraining flow's training step itself, ``app.training.train_and_evaluate``, in an
  MLflow run of a throw-away store: normalisation, the seeded split, per-epoch validation on the
  hold-out, per-epoch metrics logged to MLflow, progress lines. Its images/s is the run's
  ``train_images_per_second`` metric, the clock the flow itself reports (``model.fit`` only: the
  evaluation, plots and model logging that follow are not training);
* ``reference``: a bare ``model.fit`` of the Keras reference CNN (34,826 parameters): an absolute
  figure, to set against what the CPU allows for that net (benchmarks/README.md).

Each figure is images/s over the whole ``model.fit`` call (the first epoch's tracing included, alike
for all); the ratios are ours / bare and ours / bare+val from the same round. Beside them, images/s
over the epochs alone (from epoch begin to epoch end, as Keras reports them): the difference is what
``fit`` spent outside its epochs, where Keras' own pipeline for arrays can sit idle (see
``pipeline.train.batches``).
Nothing here asserts: it prints a table and writes JSON.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import RESULTS, ROOT, command_line, say, table, write_results

from pipeline.data import Dataset, has_dataset, ingest, load_dataset
from pipeline.params import Params, load_params
from pipeline.preprocess import to_model_input

OUTPUT = RESULTS / "training_throughput.json"


def bare_fit(dataset: Dataset, params: Params, reference: bool = False, validate: bool = False) -> dict[str, float]:
    """A plain ``model.fit`` on in-memory arrays (the same images ``train`` fits on): its figures."""
    import keras

    from pipeline.model import build_model
    from pipeline.train import seed_everything, split_for_validation

    seed_everything(params.train.seed)
    x_fit, y_fit, x_val, y_val = split_for_validation(
        dataset.x_train, dataset.y_train, params.train.validation_split, params.train.seed
    )
    x, y = to_model_input(x_fit), y_fit.astype(np.int32)
    validation_data = (to_model_input(x_val), y_val.astype(np.int32)) if validate else None
    steps = int(np.ceil(len(x) / params.train.batch_size))
    if reference:
        from accuracy_per_cpu_minute import reference_model  # a sibling: a script's own folder is on sys.path

        model = reference_model(steps, params.train.epochs)
    else:
        model = build_model(params.model, params.train, steps)
    epochs: list[float] = []
    clock = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: epochs.append(-time.perf_counter()),
        on_epoch_end=lambda epoch, logs: epochs.append(epochs.pop() + time.perf_counter()),
    )
    started = time.perf_counter()
    model.fit(
        x,
        y,
        batch_size=params.train.batch_size,
        epochs=params.train.epochs,
        validation_data=validation_data,
        shuffle=True,
        verbose=0,
        callbacks=[clock],
    )
    return figures(len(x) * params.train.epochs, time.perf_counter() - started, epochs)


def figures(images: int, fit_seconds: float, epoch_seconds: list[float]) -> dict[str, float]:
    """images/s over the whole fit and over its epochs alone, and the seconds of each."""
    return {
        "images_per_second": round(images / fit_seconds, 1),
        "epoch_images_per_second": round(images / sum(epoch_seconds), 1),
        "fit_seconds": round(fit_seconds, 2),
        "epoch_seconds": round(sum(epoch_seconds), 2),
    }


def our_step(home: Path, params: Params) -> dict[str, float]:
    """The flow's own training step, tracked in a throw-away MLflow store: the figures it logged."""
    from app import training
    from pipeline import registry, tracking
    from pipeline.settings import Settings

    settings = Settings(home=home)
    client = registry.connect(settings)
    experiment = client.get_experiment_by_name(settings.experiment)
    run_id = client.create_run(experiment.experiment_id, run_name="training-throughput").info.run_id
    with tracking.run_context(settings, run_id, stage="training"):
        training.train_and_evaluate(settings, params, run_id)
    metrics = client.get_run(run_id).data.metrics
    epochs = [m.value for m in client.get_metric_history(run_id, "epoch_seconds")]
    return figures(round(metrics["train_images_per_second"] * metrics["train_seconds"]), metrics["train_seconds"], epochs)


def place_data(home: Path, quick: bool) -> None:
    """The data under ``home`` where ``train_candidate`` reads it as the flow does: a small copy, or a link to all of it."""
    if not quick:
        (home / "data").symlink_to(ROOT / "data", target_is_directory=True)
        return
    small = load_dataset(Path("data")).head(6_000, 1_000)
    (home / "data" / "mnist").mkdir(parents=True)
    for name, array in (
        ("train_images", small.x_train),
        ("train_labels", small.y_train),
        ("test_images", small.x_test),
        ("test_labels", small.y_test),
    ):
        np.save(home / "data" / "mnist" / f"{name}.npy", array)


def run_rounds(home: Path, dataset: Dataset, params: Params, rounds: int) -> list[dict]:
    """bare, bare+val, ours in every round, alternating so that drift hits all three alike; the reference last."""
    rows: list[dict] = []
    for round_ in range(1, rounds + 1):
        for config, run in (
            ("bare", lambda: bare_fit(dataset, params)),
            ("bare+val", lambda: bare_fit(dataset, params, validate=True)),
            ("ours", lambda: our_step(home, params)),
        ):
            rows.append({"round": round_, "config": config, **run()})
            say(f"  round {round_} {config}: {rows[-1]['images_per_second']:,.0f} images/s")
    rows.append({"round": 0, "config": "reference (bare)", **bare_fit(dataset, params, reference=True)})
    say(f"  reference: {rows[-1]['images_per_second']:,.0f} images/s")
    return rows


def ratios_of(rows: list[dict], rounds: int, key: str, baseline: str) -> list[float]:
    """ours / ``baseline`` in each round, of figure ``key``."""
    by_round = [{r["config"]: r[key] for r in rows if r["round"] == n} for n in range(1, rounds + 1)]
    return [figure["ours"] / figure[baseline] for figure in by_round]


def print_report(rows: list[dict], ratios: dict[str, list[float]], images: int, epochs: int, batch: int) -> None:
    def listed(values: list[float]) -> str:
        return f"{', '.join(f'{r:.3f}' for r in values)} (median {statistics.median(values):.3f})"

    print(f"\n{images:,} training images, {epochs} epoch(s) per fit, batch {batch}; {os.cpu_count()} CPU cores")
    columns = [("round", ">5"), ("config", "<18"), ("images/s", ">9,.0f"), ("fit s", ">7.1f"), ("epochs s", ">8.1f")]
    columns += [("epochs images/s", ">15,.0f")]
    keys = ("config", "images_per_second", "fit_seconds", "epoch_seconds", "epoch_images_per_second")
    print(table(columns, [[row["round"] or "-", *(row[k] for k in keys)] for row in rows]))
    print(f"\nours / bare:          {listed(ratios['bare'])}; target >= 1.0")
    print(f"  over the epochs:    {listed(ratios['bare epochs'])}")
    print(f"ours / bare+val:      {listed(ratios['bare+val'])}")
    print(f"  over the epochs:    {listed(ratios['bare+val epochs'])}")
    print("(over the epochs: without the seconds fit spends before the first epoch and after the last)")
    median = {
        c: statistics.median(r["images_per_second"] for r in rows if r["config"] == c) for c in ("bare", "bare+val", "ours")
    }
    print(
        f"default net: bare {median['bare']:,.0f}, bare+val {median['bare+val']:,.0f}, ours {median['ours']:,.0f} images/s;"
        f" Keras reference net, bare: {rows[-1]['images_per_second']:,.0f} images/s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = command_line(__doc__, OUTPUT, quick="smoke run: 1 round, 1 epoch, 6,000 images")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per fit (default 2)")
    parser.add_argument("--rounds", type=int, default=2, help="bare/ours pairs (default 2)")
    args = parser.parse_args(argv)

    os.chdir(ROOT)
    rounds = 1 if args.quick else args.rounds
    epochs = 1 if args.quick else args.epochs
    params = load_params(Path("params.yaml"), {"train.epochs": epochs})
    if not has_dataset(Path("data")):
        ingest(params.data, Path("data"), Path(".cache"))
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="digits-throughput-") as tmp:
        place_data(Path(tmp), args.quick)
        dataset = load_dataset(Path(tmp) / "data")
        rows = run_rounds(Path(tmp), dataset, params, rounds)

    ratios = {
        "bare": ratios_of(rows, rounds, "images_per_second", "bare"),
        "bare epochs": ratios_of(rows, rounds, "epoch_images_per_second", "bare"),
        "bare+val": ratios_of(rows, rounds, "images_per_second", "bare+val"),
        "bare+val epochs": ratios_of(rows, rounds, "epoch_images_per_second", "bare+val"),
    }
    fitted = len(dataset.x_train) - int(round(len(dataset.x_train) * params.train.validation_split))
    print_report(rows, ratios, fitted, epochs, params.train.batch_size)

    def rounded(values: list[float]) -> list[float]:
        return [round(r, 4) for r in values]

    write_results(
        args.output,
        "training_throughput",
        quick=args.quick,
        epochs=epochs,
        batch_size=params.train.batch_size,
        rows=rows,
        ratios_ours_vs_bare=rounded(ratios["bare"]),
        median_ratio=round(statistics.median(ratios["bare"]), 4),
        epoch_ratios_ours_vs_bare=rounded(ratios["bare epochs"]),
        median_epoch_ratio=round(statistics.median(ratios["bare epochs"]), 4),
        ratios_ours_vs_bare_validating=rounded(ratios["bare+val"]),
        median_ratio_vs_bare_validating=round(statistics.median(ratios["bare+val"]), 4),
        epoch_ratios_ours_vs_bare_validating=rounded(ratios["bare+val epochs"]),
        median_epoch_ratio_vs_bare_validating=round(statistics.median(ratios["bare+val epochs"]), 4),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
