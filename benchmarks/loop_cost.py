"""The loop's costs: writing the prediction log, harvesting corrections into a data version, monitoring a window.

Run from the project folder:

    .venv/bin/python benchmarks/loop_cost.py [--answers 100000] [--corrections 10000] [--quick]

Everything happens in a temporary project (git, DVC with a local remote, this project's params.yaml,
MNIST ingested from the cache) and its SQLite prediction log, in this one process:

* ``write``   -- ``--answers`` answers through the service's ``LogWriter`` (a thread, batched inserts of
                 many rows a statement), sent as requests of 64 answers, timed from the first
                 ``submit`` to the end of ``close``. Baseline: the same rows inserted with SQLAlchemy's
                 own executemany (a dict a row) in batches of the same size by this thread, into a
                 fresh database.
* ``harvest`` -- ``--corrections`` of those answers corrected (accepted), then ``app.feedback.harvest``:
                 the new feedback parts, Great Expectations on the whole dataset, a DVC version.
                 Baseline: ``app.data.validate`` on the same grown dataset, which the harvest
                 cannot avoid. A second harvest with nothing new is timed too.
* ``monitor`` -- ``app.monitoring.monitor`` over a window holding every answer, against the champion of a
                 1-epoch retrain (the real flow, on a temporary Prefect server: the monitor's reference is
                 that run's validation hold-out). Baseline: the same over a window of the last
                 ``--small-window`` answers, so the ratio says how the cost grows with the window.

The inputs are MNIST training images (the harvest rejects test images); the answers are made up,
since no cost here depends on them. Nothing here asserts: it prints a table and writes JSON.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
from harness import RESULTS, ROOT, command_line, say, table, write_results

OUTPUT = RESULTS / "loop_cost.json"
BATCH = 1000  # the writer's own batch size
REQUEST = 64  # answers a request carries, as a client sending batches would


def make_project(folder: Path) -> Path:
    """A project like a fresh clone's: params.yaml, git, DVC with a local remote, MNIST from the cache."""
    home = folder / "project"
    home.mkdir()
    shutil.copy(ROOT / "params.yaml", home / "params.yaml")
    shutil.copy(ROOT / ".gitignore", home / ".gitignore")
    (home / ".cache").symlink_to(ROOT / ".cache")
    first_commit = ["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-q", "--allow-empty", "-m", "0"]
    for command in (["git", "init", "-q"], first_commit):
        subprocess.run(command, cwd=home, check=True, capture_output=True)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=home, check=True)
    (home / ".dvc" / "config").write_text("[core]\n    remote = local\n['remote \"local\"']\n    url = ../.dvc-remote\n")
    return home


def answers(count: int, rng: np.random.Generator) -> list[dict]:
    probabilities = rng.dirichlet(np.full(10, 0.3), size=count).round(6)
    return [
        {
            "digit": int(p.argmax()),
            "confidence": float(p.max()),
            "unsure": bool(p.max() < 0.9),
            "probabilities": p.tolist(),
            "model_name": "digits-cnn",
            "model_version": "1",
            "run_id": "benchmark",
        }
        for p in probabilities
    ]


def requests(images: np.ndarray, made_up: list[dict]) -> list:
    """The answers as the service logs them: a request at a time, ``REQUEST`` answers each."""
    from pipeline import prediction_log

    ids = [prediction_log.new_request_id() for _ in made_up]
    parts = [slice(at, at + REQUEST) for at in range(0, len(made_up), REQUEST)]
    return [prediction_log.answered(ids[part], "pixels", made_up[part], "tflite-int8", images[part]) for part in parts]


def time_writer(url: str, logged: list, count: int) -> float:
    from pipeline import prediction_log

    writer = prediction_log.LogWriter(prediction_log.open_log(url), capacity=count + 1, batch_size=BATCH).start()
    started = time.perf_counter()
    for request in logged:
        writer.submit(request)
    writer.close(timeout=3600)
    seconds = time.perf_counter() - started
    assert writer.stats()["written"] == count, writer.stats()
    return seconds


def time_bare_inserts(url: str, logged: list) -> float:
    import sqlalchemy as sa

    from pipeline import prediction_log

    engine = prediction_log.open_log(url)
    per_batch = BATCH // REQUEST
    started = time.perf_counter()
    for start in range(0, len(logged), per_batch):
        with engine.begin() as connection:
            columns = prediction_log.prediction_columns(logged[start : start + per_batch])
            as_dicts = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
            connection.execute(sa.insert(prediction_log.predictions), as_dicts)
    return time.perf_counter() - started


def time_monitor(settings, count: int, small: int) -> tuple[float, float, str]:
    """Retrain for 1 epoch (the real flow), then time the monitor over every answer and over the last ``small``."""
    import sqlalchemy as sa

    from app import monitoring
    from flows.temporary_server import prefect_api
    from pipeline import prediction_log
    from pipeline.params import load_params

    with prefect_api():
        from flows.retrain import retrain

        # one epoch cannot clear the floors made for fifteen: the monitor only needs a champion to compare with
        # (in a temporary store, so lowering the bar moves no real champion)
        overrides = {"train.epochs": 1, "feedback.train_weight": 1, "gate.min_accuracy": 0.9, "gate.min_family_accuracy": {}}
        summary = retrain(overrides=overrides, allow_unsafe_overrides=True)
    if not summary["promoted"]:
        raise SystemExit(f"the 1-epoch retrain was not promoted, so the monitor has no reference: {summary['reasons']}")
    params = load_params(settings.params_path)
    engine = prediction_log.open_log(settings.prediction_log_url)
    with engine.connect() as connection:  # the window that holds the last ``small`` answers
        column = prediction_log.predictions.c.created_at
        newest = connection.execute(sa.select(sa.func.max(column))).scalar()
        cut = connection.execute(sa.select(column).order_by(column.desc()).offset(small).limit(1)).scalar()
    now = newest + timedelta(seconds=1)  # the windows end just after the newest answer
    timings, verdicts = [], []
    for window in ("365d", f"{(now - cut).total_seconds() / 60:.4f}m"):
        started = time.perf_counter()
        report = monitoring.monitor(settings, params, window, now=now)
        timings.append(time.perf_counter() - started)
        verdicts.append(report["verdict"])
        say(f"  monitor {window}: {report['predictions']:,} answers, {report['verdict']}, {timings[-1]:.1f} s")
    return timings[0], timings[1], verdicts[0]


def main() -> None:
    parser = command_line(__doc__, OUTPUT, "2,000 answers and 500 corrections, to check the script")
    parser.add_argument("--answers", type=int, default=100_000)
    parser.add_argument("--corrections", type=int, default=10_000)
    parser.add_argument("--small-window", type=int, default=1_000, help="answers in the monitor's baseline window")
    args = parser.parse_args()
    count, corrected = (2_000, 500) if args.quick else (args.answers, args.corrections)
    small = min(args.small_window, count // 2)

    with tempfile.TemporaryDirectory() as folder:
        home = make_project(Path(folder))
        os.environ["DIGITS_HOME"] = str(home)
        from app import data as datasets
        from app import feedback
        from pipeline import prediction_log
        from pipeline.data import load_dataset
        from pipeline.params import load_params
        from pipeline.settings import get_settings

        settings = get_settings()
        params = load_params(settings.params_path)
        say("ingesting MNIST into the temporary project")
        datasets.prepare(settings, params)
        mnist = load_dataset(settings.data_dir)
        rng = np.random.default_rng(0)
        picked = rng.choice(len(mnist.x_train), size=count, replace=count > len(mnist.x_train))
        images, labels = mnist.x_train[picked], mnist.y_train[picked]
        made_up = answers(count, rng)

        say(f"writing {count:,} answers through the LogWriter, then the same rows inserted directly")
        logged = requests(images, made_up)
        writer_seconds = time_writer(settings.prediction_log_url, logged, count)
        bare_seconds = time_bare_inserts(f"sqlite:///{Path(folder) / 'bare.db'}", requests(images, made_up))
        size = Path(settings.prediction_log_url.removeprefix("sqlite:///")).stat().st_size

        say(f"correcting {corrected:,} answers, then harvesting them")
        engine = prediction_log.open_log(settings.prediction_log_url)
        policy = prediction_log.FeedbackPolicy(quarantine_confidence=1.01, client_daily_cap=10**9)
        request_ids = [request_id for request in logged for request_id in request.request_ids]
        answered = zip(images, request_ids, labels, strict=True)
        chosen = list({image.tobytes(): (request_id, label) for image, request_id, label in answered}.values())[:corrected]
        for request_id, label in chosen:  # the true digit: the retrain below trains on these
            prediction_log.record_feedback(engine, request_id, int(label), "benchmark", policy)
        started = time.perf_counter()
        report = feedback.harvest(settings, params)
        harvest_seconds = time.perf_counter() - started
        started = time.perf_counter()
        datasets.validate(settings, params)
        validate_seconds = time.perf_counter() - started
        started = time.perf_counter()
        again = feedback.harvest(settings, params)
        empty_seconds = time.perf_counter() - started

        say("a 1-epoch retrain for a champion the monitor can take its reference from")
        monitor_seconds, small_seconds, verdict = time_monitor(settings, count, small)

    results = {
        "answers": count,
        "corrections": len(chosen),
        "write": {
            "writer_seconds": round(writer_seconds, 2),
            "answers_per_second": round(count / writer_seconds),
            "bare_insert_seconds": round(bare_seconds, 2),
            "writer_over_bare": round(writer_seconds / bare_seconds, 2),
            "database_bytes": size,
        },
        "harvest": {
            "seconds": round(harvest_seconds, 2),
            "validation_seconds": round(validate_seconds, 2),
            "harvest_over_validation": round(harvest_seconds / validate_seconds, 2),
            "added": report["added"],
            "nothing_new_seconds": round(empty_seconds, 2),
            "nothing_new_message": again["message"],
        },
        "monitor": {
            "seconds": round(monitor_seconds, 2),
            "window_answers": count,
            "small_window_seconds": round(small_seconds, 2),
            "small_window_answers": small,
            "ratio": round(monitor_seconds / small_seconds, 2),
            "verdict": verdict,
        },
    }
    print(
        table(
            [("step", "<34"), ("seconds", ">9.2f"), ("baseline s", ">10.2f"), ("ratio", ">7.2f"), ("", "")],
            [
                (
                    f"write {count:,} answers (LogWriter)",
                    writer_seconds,
                    bare_seconds,
                    writer_seconds / bare_seconds,
                    f"{count / writer_seconds:,.0f} answers/s; baseline: direct inserts",
                ),
                (
                    f"harvest {len(chosen):,} corrections",
                    harvest_seconds,
                    validate_seconds,
                    harvest_seconds / validate_seconds,
                    f"added {report['added']}; baseline: validation alone",
                ),
                ("harvest with nothing new", empty_seconds, None, None, again["message"][:60]),
                (
                    f"monitor {count:,} answers",
                    monitor_seconds,
                    small_seconds,
                    monitor_seconds / small_seconds,
                    f"baseline: the last {small:,} answers; {verdict[:50]}",
                ),
            ],
        )  # fmt: skip
    )
    print(f"log database: {size / 1e6:.1f} MB for {count:,} answers ({size / count:,.0f} bytes an answer)")
    write_results(args.output, "loop_cost", quick=args.quick, **results)


if __name__ == "__main__":
    main()
