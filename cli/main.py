"""``digits``: retrain, inspect and override the champion, manage data, open the UIs, predict, monitor."""

from __future__ import annotations

import atexit
import gc

import typer

from cli import cards, data, feedback, models, monitoring, operations, serving, stages, training
from cli.processes import interrupt_on_stop_signals

digits = typer.Typer(
    help=(
        "Handwritten-digit MLOps: DVC data versions, Great Expectations checks, Keras training "
        "tracked in MLflow, a promotion gate, the MLflow Model Registry and a BentoML service.\n\n"
        "Typical use: `digits retrain` (trains and promotes if the gate passes), "
        "`digits status`, `digits ui`, `digits serve`; then `digits feedback`, `digits data harvest` and "
        "`digits monitor --retrain-when-needed` close the loop from answers back to training."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@digits.callback()
def _exit_without_final_garbage_collections() -> None:
    # At exit the interpreter's last garbage collections walk every object TensorFlow, Prefect and MLflow
    # made, freeing memory the OS takes back anyway; frozen objects are skipped. Registered first, this
    # runs after every other exit handler (Prefect's, MLflow's).
    atexit.register(gc.freeze)
    # SIGTERM (a process manager) and SIGHUP (a closed terminal) stop a command as Ctrl+C does, so that
    # what it started (a temporary Prefect server) is stopped too
    interrupt_on_stop_signals()


for command in (
    training.retrain,
    training.sweep,
    models.status,
    models.evaluate,
    cards.card,
    models.promote,
    models.rollback,
    models.reproduce,
    models.trace,
    operations.ui,
    operations.deploy,
    stages.validate,
    stages.train,
    stages.gate,
    serving.predict,
    serving.serve,
    monitoring.monitor,
):
    digits.command()(command)
digits.add_typer(data.data, name="data")
digits.add_typer(feedback.feedback, name="feedback")
digits.add_typer(feedback.log, name="log")
