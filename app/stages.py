"""The stages of ``dvc.yaml`` (``dvc repro``): train one candidate to a file, gate it from that file, record outputs."""

from __future__ import annotations

import json
from pathlib import Path

from app import data, training
from app.promotion import Outcome, gate, promote
from app.training import Candidate
from pipeline import tracking, versioning
from pipeline.gate import GateDecision
from pipeline.params import Params
from pipeline.settings import Settings


def train(settings: Settings, params: Params, out: Path) -> Candidate:
    """Train and evaluate one candidate in its own MLflow run, written to ``out`` as JSON; no gate."""
    data_version = data.current_version(settings)
    run_id = tracking.start_run(settings, params, data_version, run_name=f"train-{data_version.short}")
    with tracking.run_context(settings, run_id, stage="training"):
        candidate = training.train_and_evaluate(settings, params, run_id)
    _write(out, candidate.to_json())
    return candidate


def gate_and_promote(settings: Settings, params: Params, candidate_file: Path, out: Path | None = None) -> Outcome:
    """Gate the candidate ``train`` wrote and promote it if it passes; the decision goes to ``out``."""
    candidate = Candidate.from_json(candidate_file.read_text())
    outcome = promote(settings, candidate, gate(settings, params, candidate))
    if out:
        _write(out, json.dumps(outcome.decision.to_dict(), indent=2))
    return outcome


def record(settings: Settings, candidate: Candidate, decision: GateDecision) -> bool:
    """After a retrain of params.yaml as it is: the stage outputs, and the run in dvc.lock so `dvc repro` skips it."""
    _write(settings.reports_dir / "candidate.json", candidate.to_json())
    _write(settings.reports_dir / "gate.json", json.dumps(decision.to_dict(), indent=2))
    return versioning.lock_stages(settings.home)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
