"""What Prefect, MLflow and DVC add to a retrain's wall time: ``digits retrain`` against the same steps called directly.

Run from the project folder:

    .venv/bin/python benchmarks/orchestration_cost.py [--epochs 1 3] [--rounds N] [--quick]

For each epoch count, in fresh subprocesses one after the other, on the full MNIST (``--rounds N``:
all of it N times over, the flow first in every other round, and medians):

* ``direct``: the same pipeline functions called from a plain script, without Prefect, MLflow or DVC:
  ingest -> Great Expectations validation -> train -> score the test set -> TensorFlow Lite exports,
  checked on the test set -> gate decision;
* ``flow``: ``digits retrain`` in a throw-away project (git + DVC with a local remote + its own
  MLflow store): the Prefect flow with every task, DVC add/push and dvc.lock, MLflow params,
  per-epoch metrics, plots, the model, registration, the smoke prediction from the registry and the
  promotion.

Both start from a bare interpreter (imports included) and ingest from the same local ``.npz`` copy
of MNIST. The extra wall time of the flow, measured at two training lengths, splits into a fixed
part and a part proportional to the work: ``flow - direct = fixed + share x direct``. Targets
(``TARGET_SHARE``, ``TARGET_FIXED_SECONDS``): ``share`` at most 5 %, ``fixed`` under 15 s. Nothing
here asserts: it prints a table and writes JSON.

The host's stalls land mostly in training, the longest part, and can move one run's wall time by
more than the flow's whole overhead. So each run's ``model.fit`` time is read too (the direct
script prints it; the flow logs ``train_seconds`` to its MLflow run), and the time outside the fit
is compared as well: ``flow - direct`` outside the fit is the orchestration's own cost, and
``flow fit / direct fit`` says whether tracking slows training.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from harness import RESULTS, ROOT, command_line, say, table, write_results

from pipeline.data import has_dataset, ingest, load_dataset
from pipeline.params import load_params

OUTPUT = RESULTS / "orchestration_cost.json"
# the target: the flow may take at most this share more than the direct script, plus this fixed start-up
TARGET_SHARE, TARGET_FIXED_SECONDS = 0.05, 15.0

# the pipeline without orchestration, tracking or versioning: the same functions the flow's tasks call
DIRECT = """
import atexit, gc, os, sys, time
atexit.register(gc.freeze)  # as `digits` does: skipping the exit's last garbage collections is not orchestration
from pathlib import Path
home = Path(sys.argv[1])
from pipeline.data import ingest, load_dataset
from pipeline.evaluate import compute_metrics, predict_classes
from pipeline.export import CALIBRATION_IMAGES, agreement, tflite_predictor, to_tflite
from pipeline.gate import decide
from pipeline.params import load_params
from pipeline.preprocess import to_model_input
from pipeline.train import compiled_predictor, train
from pipeline.validation import validate_dataset
params = load_params(home / "params.yaml")
ingest(params.data, home / "data", home / ".cache")
dataset = load_dataset(home / "data")
report = validate_dataset(dataset, params.validation, home / "reports" / "validation")
assert report.success, report.summary()
trained = train(dataset, params)
model = trained.model
print("fit_seconds", trained.seconds)
probabilities, predicted = predict_classes(compiled_predictor(model), dataset.x_test)
metrics = compute_metrics(dataset.y_test, predicted)
# the serving exports, converted and checked on the test set as the flow does (without logging them)
inputs = to_model_input(dataset.x_test)
exported = tflite_predictor(to_tflite(model), os.cpu_count())(inputs)
assert agreement(probabilities, exported).ok
int8 = to_tflite(model, calibration=to_model_input(dataset.x_train[:CALIBRATION_IMAGES]))
print("int8", agreement(probabilities, tflite_predictor(int8, os.cpu_count())(inputs), None).summary())
print("accuracy", metrics.accuracy, "promote", decide(metrics, params.gate).promote)
"""


def make_project(base: Path, name: str, source: Path, epochs: int) -> Path:
    """A project folder like a fresh clone: params.yaml on the local .npz, git, DVC with a local remote."""
    home = base / name
    home.mkdir()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(source="local", local_path=str(source))
    params["train"]["epochs"] = epochs
    (home / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(ROOT / "dvc.yaml", home / "dvc.yaml")
    (home / ".gitignore").write_text("/data/\n/mlflow/\n/reports/\n/.dvc-remote/\n/.cache/\n")

    def run(*command: str) -> None:
        subprocess.run(command, cwd=home, check=True, capture_output=True)

    run("git", "init", "-q")
    run("git", "-c", "user.name=bench", "-c", "user.email=bench@example.com", "commit", "-q", "--allow-empty", "-m", "init")
    run(str(Path(sys.executable).parent / "dvc"), "init", "-q")
    (home / ".dvc" / "config").write_text("[core]\n    remote = local\n['remote \"local\"']\n    url = ../.dvc-remote\n")
    return home


def timed_subprocess(command: list[str], home: Path, log: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(
        DIGITS_HOME=str(home),
        TF_CPP_MIN_LOG_LEVEL="2",
        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
        PYTHONPATH=str(ROOT),
        DO_NOT_TRACK="1",
    )
    started = time.perf_counter()
    with open(log, "wb") as out:
        finished = subprocess.run(command, cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if finished.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed with exit code {finished.returncode}; see {log}")
    return seconds


def fit_seconds(config: str, home: Path, log: Path) -> float:
    """The run's ``model.fit`` wall time: printed by the direct script, logged by the flow to MLflow."""
    if config == "direct":
        line = next(line for line in log.read_text().splitlines() if line.startswith("fit_seconds "))
        return float(line.split()[1])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string="metrics.train_seconds > 0")
    if len(runs) != 1:
        raise SystemExit(f"expected one training run in {home}, found {len(runs)}")
    return float(runs[0].data.metrics["train_seconds"])


def measure(base: Path, config: str, epochs: int, round_number: int, source: Path, quick_rows: int | None) -> dict:
    """One run of ``config`` in a new project: its wall time, its ``model.fit`` time, and the rest."""
    name = f"{config}-e{epochs}-r{round_number}"
    home = make_project(base, name, source, epochs)
    if quick_rows:  # the validation bounds expect the full MNIST
        params = yaml.safe_load((home / "params.yaml").read_text())
        params["validation"]["min_train_rows"] = quick_rows
        (home / "params.yaml").write_text(yaml.safe_dump(params))
    digits = str(Path(sys.executable).parent / "digits")
    command = [sys.executable, "-c", DIRECT, str(home)] if config == "direct" else [digits, "retrain"]
    log = base / f"{name}.log"
    seconds = timed_subprocess(command, home, log)
    fit = fit_seconds(config, home, log)
    return {
        "round": round_number,
        "config": config,
        "epochs": epochs,
        "seconds": round(seconds, 2),
        "fit_seconds": round(fit, 2),
        "outside_fit_seconds": round(seconds - fit, 2),
    }


def pairs_within_target(rows: list[dict]) -> tuple[int, int]:
    """How many (round, epochs) pairs meet the target's bound read literally, ``flow <= 1.05 x direct + 15 s``."""
    seconds = {(r["round"], r["epochs"], r["config"]): r["seconds"] for r in rows}
    pairs = {(r["round"], r["epochs"]) for r in rows}
    allowed = {pair: (1 + TARGET_SHARE) * seconds[(*pair, "direct")] + TARGET_FIXED_SECONDS for pair in pairs}
    within = sum(seconds[(*pair, "flow")] <= limit for pair, limit in allowed.items())
    return within, len(pairs)


def run_rounds(base: Path, dataset, epochs: list[int], rounds: int, quick: bool) -> list[dict]:
    """Every (epochs, config) pair ``rounds`` times, on a local copy of ``dataset``, which of a pair runs first alternating."""
    source = base / "mnist.npz"
    np.savez(source, x_train=dataset.x_train, y_train=dataset.y_train, x_test=dataset.x_test, y_test=dataset.y_test)
    rows = []
    for round_number in range(1, rounds + 1):
        order = ("direct", "flow") if round_number % 2 else ("flow", "direct")  # the machine's speed drifts over minutes
        for n in epochs:
            for config in order:
                row = measure(base, config, n, round_number, source, quick_rows=len(dataset.x_train) if quick else None)
                rows.append(row)
                say(
                    f"  round {round_number}/{rounds}, {config} {n} epoch(s): {row['seconds']:.1f} s,"
                    f" of which model.fit {row['fit_seconds']:.1f} s"
                )
    return rows


def overhead(rows: list[dict], epochs: list[int]) -> dict:
    """Medians by (config, epochs), and the flow's extra time split into a fixed part and a share of the work."""

    def median_of(key: str) -> dict[tuple[str, int], float]:
        pairs = [(config, n) for config in ("direct", "flow") for n in epochs]
        return {pair: statistics.median(r[key] for r in rows if (r["config"], r["epochs"]) == pair) for pair in pairs}

    seconds, fits, outsides = median_of("seconds"), median_of("fit_seconds"), median_of("outside_fit_seconds")
    short, long = epochs
    extra = {n: seconds["flow", n] - seconds["direct", n] for n in epochs}
    share = (extra[long] - extra[short]) / (seconds["direct", long] - seconds["direct", short])
    return {
        "seconds": seconds,
        "fits": fits,
        "extra": extra,
        "share": share,
        "fixed": extra[short] - share * seconds["direct", short],
        # outside model.fit: what orchestration, tracking and versioning add, without the training's noise
        "outside": {n: outsides["flow", n] - outsides["direct", n] for n in epochs},
        "fit_ratio": sum(fits["flow", n] for n in epochs) / sum(fits["direct", n] for n in epochs),
    }


def print_report(cost: dict, rows: list[dict], epochs: list[int], rounds: int, images: int) -> None:
    seconds, fits, extra, outside = cost["seconds"], cost["fits"], cost["extra"], cost["outside"]
    short, long = epochs
    medians = f"medians of {rounds} rounds" if rounds > 1 else "one round"
    print(f"\n{images:,} training images; fresh subprocesses; {medians}; {os.cpu_count()} CPU cores")
    columns = [("epochs", ">6"), ("direct s", ">9.1f"), ("flow s", ">8.1f"), ("extra s", ">8.1f"), ("flow/direct", ">11")]
    columns += [("direct fit", ">10.1f"), ("flow fit", ">9.1f"), ("extra outside fit", ">17.1f")]
    ratio = {n: f"{seconds['flow', n] / seconds['direct', n]:.3f}x" for n in epochs}
    lines = [
        (n, seconds["direct", n], seconds["flow", n], extra[n], ratio[n], fits["direct", n], fits["flow", n], outside[n])
        for n in epochs
    ]
    print(table(columns, lines))
    fixed_met = "met" if cost["fixed"] < TARGET_FIXED_SECONDS else "not met"
    share_met = "met" if cost["share"] <= TARGET_SHARE else "not met"
    print(
        f"\nwall times: flow - direct = {cost['fixed']:.1f} s fixed + {cost['share']:.1%} of the direct time"
        f" (targets: fixed < {TARGET_FIXED_SECONDS:.0f} s {fixed_met}, share <= {TARGET_SHARE:.0%} {share_met})"
    )
    print(
        f"outside model.fit: the flow adds {outside[short]:.1f} s ({short} epoch(s)) and {outside[long]:.1f} s"
        f" ({long}); its fits took {cost['fit_ratio']:.3f}x the direct script's"
    )
    # the two-point fit above moves a lot with one noisy median; this reads each pair alone
    within, pairs = pairs_within_target(rows)
    print(f"flow <= 1.05 x direct + 15 s: {within} of {pairs} pairs")


def main(argv: list[str] | None = None) -> int:
    parser = command_line(__doc__, OUTPUT, quick="smoke run: 10,000 training images, 1 and 2 epochs")
    parser.add_argument(
        "--epochs",
        type=int,
        nargs=2,
        default=[1, 3],
        metavar=("SHORT", "LONG"),
        help="the two training lengths (default 1 and 3 epochs)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every pair this many times, one after the other, and report medians (the host's stalls move single runs)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the throw-away projects and logs (printed)")
    args = parser.parse_args(argv)

    epochs = [1, 2] if args.quick else args.epochs
    if not has_dataset(ROOT / "data"):
        ingest(load_params(ROOT / "params.yaml").data, ROOT / "data", ROOT / ".cache")
    dataset = load_dataset(ROOT / "data")
    if args.quick:
        dataset = dataset.head(10_000, None)
    base = Path(tempfile.mkdtemp(prefix="digits-orchestration-"))
    try:
        rows = run_rounds(base, dataset, epochs, args.rounds, args.quick)
    finally:
        if args.keep:
            print(f"projects and logs kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    cost = overhead(rows, epochs)
    print_report(cost, rows, epochs, args.rounds, len(dataset.x_train))
    within, pairs = pairs_within_target(rows)
    write_results(
        args.output,
        "orchestration_cost",
        quick=args.quick,
        rounds=args.rounds,
        training_images=len(dataset.x_train),
        rows=rows,
        fixed_seconds=round(cost["fixed"], 2),
        proportional_share=round(cost["share"], 4),
        extra_outside_fit_seconds={str(n): round(cost["outside"][n], 2) for n in epochs},
        fit_ratio_flow_over_direct=round(cost["fit_ratio"], 4),
        pairs_within_target=f"{within} of {pairs}",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
