"""The sweep flow: version and validate once, train every grid candidate in parallel on Dask, gate the best.

The grid is ``sweep.grid`` in params.yaml. Candidates train as Prefect tasks on a ``DaskTaskRunner``:
a local cluster sized for this machine by default, the scheduler in ``DIGITS_DASK_ADDRESS`` at scale.
Each candidate is its own MLflow run, nested under the sweep's run. The choice is made on the
validation hold-out (``train.validation_split``) only; the chosen candidate then meets the test set
and goes through the same gate and promotion as ``retrain-digits`` (floors, champion re-scored).

Dask workers are separate processes (other machines at scale): tasks get settings, params and run
ids, and hand back run ids and a few numbers, never arrays or models.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.retrain import gate, promote, render_summary, summarize, validate, version_data
from flows.temporary_server import TemporaryPrefectServer
from pipeline import registry, steps
from pipeline.params import Params, SweepCandidate, load_params, sweep_candidates
from pipeline.settings import Settings, get_settings
from pipeline.validation import DataValidationError

log = logging.getLogger(__name__)

_task = dict(cache_policy=NO_CACHE)


@dataclass(frozen=True)
class Cluster:
    """Where the candidates train: a scheduler address, or the size of a local cluster."""

    address: str | None
    workers: int | None  # local cluster only
    tf_threads: int | None  # TensorFlow threads per training; None: TensorFlow's own default

    def describe(self) -> str:
        threads = (
            f"{self.tf_threads} TensorFlow thread{'s' if self.tf_threads != 1 else ''}"
            if self.tf_threads
            else "TensorFlow's default threads"
        )
        if self.address:
            return f"the Dask scheduler at {self.address} ({threads} per training)"
        return f"a local Dask cluster of {self.workers} worker{'s' if self.workers != 1 else ''} x {threads}"


def plan_cluster(settings: Settings, candidates: int, address: str | None = None, cores: int | None = None) -> Cluster:
    """Size the cluster: one worker per core (no more than candidates), the cores shared out as TensorFlow threads.

    Each worker runs one training at a time (one Dask thread); TensorFlow's pools are limited so
    that the workers do not fight over the cores. A scheduler address leaves sizing to its workers.
    """
    address = address or settings.dask_address
    if address:
        return Cluster(address, None, settings.sweep_tf_threads)
    cores = cores or _usable_cores()
    workers = settings.dask_workers or max(1, min(candidates, cores))
    return Cluster(None, workers, settings.sweep_tf_threads or max(1, cores // workers))


def _usable_cores() -> int:
    """Cores this process may run on (a container's or taskset's limit, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def task_runner(cluster: Cluster):
    """The flow's ``DaskTaskRunner`` for ``cluster`` (nothing starts until the flow runs)."""
    from prefect_dask import DaskTaskRunner

    if cluster.address:
        return DaskTaskRunner(address=cluster.address)
    threads = str(cluster.tf_threads)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": cluster.workers,
            "threads_per_worker": 1,  # one training per worker at a time
            "processes": True,
            "dashboard_address": None,
            # read by TensorFlow and OpenMP when a worker starts; train_trial also sets the pools itself
            "env": {"TF_NUM_INTRAOP_THREADS": threads, "TF_NUM_INTEROP_THREADS": threads, "OMP_NUM_THREADS": threads},
        }
    )


@contextmanager
def prefect_api_for_workers(cluster: Cluster) -> Iterator[None]:
    """Give Dask workers the Prefect API this process uses.

    With no Prefect server configured, Prefect starts a temporary one per process: every worker would
    start its own. Here one temporary server is started (unless `digits sweep` started it already) and
    its address handed to the flow, which passes it on to the workers with each task. It listens on
    127.0.0.1 only: workers on other machines need PREFECT_API_URL set to a Prefect server they can reach.
    """
    from prefect.settings import PREFECT_API_URL

    server = TemporaryPrefectServer.start_unless_configured()
    try:
        with server.api() if server else nullcontext():
            api_url = PREFECT_API_URL.value()
            if cluster.address and api_url and urlsplit(api_url).hostname in ("127.0.0.1", "localhost", "::1"):
                log.warning(
                    "the Prefect API at %s is on this machine only: Dask workers on other machines cannot report to it. "
                    "Set PREFECT_API_URL to a Prefect server they can reach.",
                    api_url,
                )
            yield
    finally:
        if server:
            server.stop()


# ---------------------------------------------------------------- tasks


@task(name="open the sweep's MLflow run", retries=2, retry_delay_seconds=2, **_task)
def open_sweep_run(settings: Settings, params: Params, data_version, candidates: list[SweepCandidate]) -> str:
    run_id = steps.start_run(settings, params, data_version, run_name=f"sweep-{data_version.short}")
    client = registry.connect(settings)
    client.set_tag(run_id, "kind", "sweep")
    client.log_param(run_id, "sweep.grid", json.dumps(params.sweep.grid)[:6000])
    client.log_param(run_id, "sweep.candidates", len(candidates))
    client.log_dict(run_id, {c.name: c.values for c in candidates}, "sweep/grid.json")
    return run_id


@task(name="open a candidate's MLflow run", retries=2, retry_delay_seconds=2, **_task)
def open_candidate_run(settings: Settings, candidate: SweepCandidate, data_version, parent_run_id: str, short: str) -> str:
    run_id = steps.start_run(
        settings, candidate.params, data_version, run_name=f"sweep-{short}-{candidate.name}", parent_run_id=parent_run_id
    )
    client = registry.connect(settings)
    client.set_tag(run_id, "kind", "sweep-candidate")
    client.set_tag(run_id, "sweep_candidate", candidate.name)
    client.set_tag(run_id, "sweep_values", candidate.label[:5000])
    return run_id


@task(name="train a candidate (Dask worker)", **_task)
def train_candidate(settings: Settings, params: Params, run_id: str, tf_threads: int | None, log_level: int) -> steps.Trial:
    """Runs in a Dask worker process: it reads data/ and the store itself, and returns a run id and two numbers."""
    # a worker has its own logging: show the per-epoch lines as the flow's process would
    logging.getLogger("pipeline").setLevel(log_level)
    if tf_threads:
        steps.limit_tf_threads(tf_threads)
    return steps.train_trial(settings, params, run_id, tags={"dask_worker": _worker_name()})


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):  # not on a Dask worker
        return "local"


@task(name="evaluate the chosen candidate on the test set", **_task)
def evaluate(settings: Settings, trial: steps.Trial) -> steps.Candidate:
    return steps.evaluate_trial(settings, trial)


# ---------------------------------------------------------------- the flow


def _close(
    settings: Settings, run_ids: list[str], failed: bool, stopped_at: str | None = None, only_running: bool = False
) -> None:
    for run_id in run_ids:
        try:
            if only_running and registry.connect(settings).get_run(run_id).info.status != "RUNNING":
                continue  # closed already, with its own reason
            steps.finish_run(settings, run_id, failed=failed, stopped_at=stopped_at)
        except Exception as err:  # closing the others matters more than this one's status
            log.warning("could not close MLflow run %s: %s", run_id, err)


@flow(name="sweep-digits", log_prints=True)
def sweep_flow(overrides: dict[str, Any] | None = None, tf_threads: int | None = None, where: str = "") -> dict[str, Any]:
    """Train every grid candidate in parallel, gate the one with the best validation accuracy, promote it if it passes.

    ``overrides`` maps dotted params keys to values (``{"sweep.grid": {...}, "train.epochs": 2}``);
    ``tf_threads`` sizes TensorFlow in each training; ``where`` names the cluster, for the log.
    """
    logger = get_run_logger()
    settings = get_settings()
    params = load_params(settings.params_path, overrides)
    candidates = sweep_candidates(params)
    logger.info("%d candidate(s) on %s: %s", len(candidates), where or "the task runner", "; ".join(c.label for c in candidates))
    data_version = version_data(settings, params)
    parent = open_sweep_run(settings, params, data_version, candidates)
    children: list[str] = []
    try:
        validate(settings, params, parent)
        children = [open_candidate_run(settings, c, data_version, parent, data_version.short) for c in candidates]
        futures = [
            train_candidate.submit(settings, c.params, run_id, tf_threads, logging.getLogger("pipeline").getEffectiveLevel())
            for c, run_id in zip(candidates, children, strict=True)
        ]
        trials: dict[str, steps.Trial] = {}
        failures: dict[str, str] = {}
        for candidate, run_id, future in zip(candidates, children, futures, strict=True):
            try:
                trials[candidate.name] = future.result()
            except Exception as err:  # one failed candidate does not sink the others
                failures[candidate.name] = f"{type(err).__name__}: {err}".splitlines()[0][:300]  # the task run has it all
                logger.warning("candidate %s (%s) failed: %s", candidate.name, candidate.label, failures[candidate.name])
                _close(settings, [run_id], failed=True, stopped_at="training")
        if not trials:
            raise RuntimeError(f"every sweep candidate failed: {failures}")
        # the choice sees validation scores only; the test set is first used on the chosen one, below
        chosen = steps.best_trial(list(trials.values()))
        chosen_name = next(name for name, trial in trials.items() if trial is chosen)
        candidate = evaluate(settings, chosen)
        decision = gate(settings, params, candidate)
        outcome = promote(settings, candidate, decision, data_version.md5)
    except DataValidationError as err:
        _close(settings, [parent], failed=True, stopped_at="validation")
        create_markdown_artifact(err.report.summary(), key="data-validation", description="why the flow stopped")
        raise
    except BaseException:
        _close(settings, children, failed=True, stopped_at="sweep stopped", only_running=True)
        _close(settings, [parent], failed=True, stopped_at="training or promotion")
        raise
    # no dvc.lock entry, unlike retrain: the chosen candidate is not params.yaml's own configuration
    rows = _candidate_rows(candidates, children, trials, failures, chosen_name)
    _record_sweep(settings, parent, rows, outcome, chosen)
    _close(settings, [t.run_id for t in trials.values()], failed=False)
    _close(settings, [parent], failed=False)
    create_markdown_artifact(
        _candidates_markdown(rows) + "\n\n" + outcome.decision.to_markdown(), key="sweep", description="sweep"
    )
    summary = {
        **summarize(data_version, chosen.run_id, outcome, candidate),
        "sweep_run_id": parent,
        "selected": chosen_name,
        "candidates": rows,
    }
    print(render_sweep_summary(summary))
    return summary


def _candidate_rows(
    candidates: list[SweepCandidate],
    run_ids: list[str],
    trials: dict[str, steps.Trial],
    failures: dict[str, str],
    chosen: str,
) -> list[dict[str, Any]]:
    rows = []
    for candidate, run_id in zip(candidates, run_ids, strict=True):
        trial = trials.get(candidate.name)
        rows.append(
            {
                "name": candidate.name,
                "values": candidate.values,
                "run_id": run_id,
                "val_accuracy": round(trial.val_accuracy, 5) if trial else None,
                "val_loss": round(trial.val_loss, 5) if trial else None,
                "selected": candidate.name == chosen,
                "error": failures.get(candidate.name),
            }
        )
    return rows


def _record_sweep(
    settings: Settings, parent: str, rows: list[dict[str, Any]], outcome: steps.Outcome, chosen: steps.Trial
) -> None:
    """The sweep's run gets the table of candidates and the outcome; each candidate run says whether it was chosen."""
    client = registry.connect(settings)
    for row in rows:
        client.set_tag(row["run_id"], "sweep_selected", str(row["selected"]).lower())
    client.set_tag(parent, "best_run_id", chosen.run_id)
    client.set_tag(parent, "gate", "promote" if outcome.decision.promote else "reject")
    if outcome.decision.promote and outcome.registered:
        client.set_tag(parent, "promoted_version", outcome.registered.version)
    client.log_metric(parent, "best_val_accuracy", chosen.val_accuracy)
    client.log_table(
        parent,
        {
            "candidate": [r["name"] for r in rows],
            "values": [json.dumps(r["values"]) for r in rows],
            "val_accuracy": [r["val_accuracy"] for r in rows],
            "val_loss": [r["val_loss"] for r in rows],
            "selected": [r["selected"] for r in rows],
            "run_id": [r["run_id"] for r in rows],
        },
        "sweep/candidates.json",
    )


def _candidates_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| candidate | values | val accuracy | val loss | run |", "|---|---|---|---|---|"]
    for r in rows:
        name = f"**{r['name']}** (chosen)" if r["selected"] else r["name"]
        score = f"{r['val_accuracy']:.4f} | {r['val_loss']:.4f}" if r["val_accuracy"] is not None else f"failed: {r['error']} |"
        lines.append(f"| {name} | {_label(r['values'])} | {score} | {r['run_id']} |")
    return "\n".join(lines)


def _label(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "params.yaml as it is"


def render_sweep_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"sweep run      {summary['sweep_run_id']}",
        "candidates     (chosen on validation accuracy; the test set took no part)",
    ]
    for r in summary["candidates"]:
        mark = "*" if r["selected"] else " "
        score = (
            f"val accuracy {r['val_accuracy']:.4f}  val loss {r['val_loss']:.4f}" if r["val_accuracy"] is not None else "FAILED"
        )
        lines.append(f"             {mark} {r['name']:<4} {score}  {_label(r['values'])}")
        if r["error"]:
            lines.append(f"                    {r['error'][:200]}")
    return "\n".join(lines) + "\n" + render_summary(summary)


def sweep(overrides: dict[str, Any] | None = None, dask_address: str | None = None) -> dict[str, Any]:
    """Run the sweep flow on a Dask cluster: ``dask_address`` (or DIGITS_DASK_ADDRESS), else a local one."""
    settings = get_settings()
    candidates = sweep_candidates(load_params(settings.params_path, overrides))  # bad params stop before any cluster
    cluster = plan_cluster(settings, len(candidates), dask_address)
    with prefect_api_for_workers(cluster):
        run = sweep_flow.with_options(task_runner=task_runner(cluster))
        return run(overrides=overrides, tf_threads=cluster.tf_threads, where=cluster.describe())
