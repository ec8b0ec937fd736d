"""Promotion use cases: gate a candidate, promote it, promote or roll back a version by hand, report the champion.

Every move of ``champion`` goes one way: a decision from ``pipeline.gate``, then the registry's
locked compare-and-set, then the decision logged with its reasons.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app import cards, evaluation
from app.training import SMOKE_IMAGES, Candidate
from pipeline import registry, tracking
from pipeline.data import load_dataset
from pipeline.evaluate import predict_classes
from pipeline.gate import Check, GateDecision, Paired, decide
from pipeline.params import Params
from pipeline.pause import pause_point
from pipeline.settings import Settings

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from pipeline.data import Dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    decision: GateDecision
    registered: registry.ModelRef | None
    champion: registry.ModelRef | None


def gate(settings: Settings, params: Params, candidate: Candidate) -> GateDecision:
    """The candidate as it would be served, on the test set and the suite: floors, then the champion on the same images.

    Both models run their served form (export and calibration); the comparison is McNemar's test on
    the test images, the photographed family's drop, and whether anything changed at all.
    """
    client = registry.connect(settings)
    champion = registry.get_alias(client, settings.model_name)
    dataset = load_dataset(settings.data_dir)
    suite = evaluation.evaluation_sets(settings, params, dataset)
    scores = evaluation.score(candidate.run_id, candidate.model_uri, dataset, suite, settings.serve_runtime)
    log.info("candidate as served (%s): accuracy %.4f; suite %s", scores.runtime, scores.metrics.accuracy, _families(scores))
    evaluation.log_evaluation_data(settings, params, candidate.run_id, dataset, suite, scores)
    if champion is None:
        evaluation.log_scores(client, candidate.run_id, scores)
        return decide(scores.metrics, params.gate, families=scores.families)
    theirs = evaluation.score(champion.run_id, champion.uri, dataset, suite, settings.serve_runtime)
    evaluation.log_scores(client, candidate.run_id, scores, theirs, champion.version)
    paired = Paired.compare(dataset.y_test, scores.digits, theirs.digits)
    log.info("champion v%s as served: accuracy %.4f; %s", champion.version, theirs.metrics.accuracy, paired.describe())
    figures = {
        "champion_test_accuracy": theirs.metrics.accuracy,
        "gate_only_candidate_right": paired.only_candidate,
        "gate_only_champion_right": paired.only_champion,
        "gate_mcnemar_p": paired.p_value,
    }
    tracking.log_metrics(candidate.run_id, figures)
    same_setup = champion.run_id is not None and _setup(client, candidate.run_id) == _setup(client, champion.run_id)
    return decide(
        scores.metrics,
        params.gate,
        theirs.metrics,
        champion.version,
        paired=paired,
        families=scores.families,
        champion_families=theirs.families,
        same_setup=same_setup,
    )


def _families(scores: evaluation.Scores) -> str:
    return ", ".join(f"{name} {accuracy:.3f}" for name, accuracy in scores.families.items())


def _setup(client: MlflowClient, run_id: str) -> tuple[dict[str, str], str | None]:
    """What a run's model was trained from: its model and training params, and its data version."""
    run = client.get_run(run_id)
    trained_from = {k: v for k, v in run.data.params.items() if k.startswith(("model.", "train."))}
    return trained_from, run.data.tags.get("data_version")


def promote(settings: Settings, candidate: Candidate, decision: GateDecision) -> Outcome:
    """Register a candidate that cleared the gate, smoke-test the registered copy, move ``champion``."""
    client = registry.connect(settings)
    if not decision.promote:
        _log_decision(client, candidate.run_id, decision)
        return Outcome(decision, None, registry.get_alias(client, settings.model_name))
    run_tags = client.get_run(candidate.run_id).data.tags
    version = registry.register(
        client,
        settings.model_name,
        candidate.model_uri,
        candidate.run_id,
        {
            "data_version": run_tags.get("data_version", "unknown"),
            "git_commit": run_tags.get("git_commit", "unknown"),
            "test_accuracy": f"{candidate.metrics.accuracy:.4f}",
            "test_min_class_recall": f"{candidate.metrics.min_class_recall:.4f}",
            "gate_reasons": "; ".join(decision.reasons)[:4000],
            # the run's params overrides, shown with the version (`digits status`)
            **({registry.OVERRIDES_TAG: run_tags[registry.OVERRIDES_TAG]} if registry.OVERRIDES_TAG in run_tags else {}),
        },
    )
    pause_point("registered")  # a test kills the process here: a version registered, the champion not moved
    decision = decision.with_check(_smoke_check(version.uri, load_dataset(settings.data_dir), candidate.smoke_digits))
    if decision.promote:  # before the alias moves: the service loads only a version with its verdict and hashes
        registry.record_verdict(
            client, settings.model_name, version.version, registry.served_hashes(candidate.run_id, version.uri)
        )
    decision = _move_champion(client, settings, version.version, decision, "; ".join(decision.reasons), candidate.run_id)
    client.set_model_version_tag(settings.model_name, version.version, "gate", "promote" if decision.promote else "reject")
    cards.write_at_registration(settings, version.version)
    if decision.promote:
        client.set_tag(candidate.run_id, "promoted_version", version.version)
    return Outcome(
        decision,
        registry.get_version(client, settings.model_name, version.version),
        registry.get_alias(client, settings.model_name),
    )


def override(settings: Settings, params: Params, version: str, allow_regression: bool = False) -> Outcome:
    """A person's promotion of a registered version (``digits promote``), through the same checks.

    The version is re-scored as served, on the test set and the suite, against the floors, and
    compared with the champion unless ``allow_regression``; loading it is the smoke check. The decision is
    logged as an MLflow run of its own. The champion itself is accepted only when it carries no verdict
    (promoted before verdicts were recorded, so the service refuses it): it is checked against the
    floors and, when it passes, gets its verdict and hashes where it stands.
    """
    import mlflow

    client = registry.connect(settings)
    champion = registry.get_alias(client, settings.model_name)
    target = registry.get_version(client, settings.model_name, version)
    recheck = champion is not None and champion.version == target.version
    if recheck and target.verdict == registry.PROMOTE and target.served_sha256:
        raise registry.PromotionError(f"v{target.version} is already the champion")
    if recheck:
        champion, allow_regression = None, True  # nothing to compare it with but itself
    dataset = load_dataset(settings.data_dir)
    suite = evaluation.evaluation_sets(settings, params, dataset)
    try:
        # the files as they are now, hashed first and scored through those hashes: what passes is what gets recorded
        hashes = registry.served_hashes(target.run_id, target.uri)
        scores = evaluation.score(target.run_id, target.uri, dataset, suite, settings.serve_runtime, expected=hashes)
    except Exception as err:  # a version that cannot load or answer is not promotable
        raise registry.PromotionError(f"v{target.version} failed the smoke check: {type(err).__name__}: {err}") from None
    metrics = scores.metrics
    if champion is not None and not allow_regression:
        theirs = evaluation.score(champion.run_id, champion.uri, dataset, suite, settings.serve_runtime)
        decision = decide(
            metrics,
            params.gate,
            theirs.metrics,
            champion.version,
            paired=Paired.compare(dataset.y_test, scores.digits, theirs.digits),
            families=scores.families,
            champion_families=theirs.families,
        )
    else:
        decision = decide(metrics, params.gate, families=scores.families)
    decision = decision.with_check(Check("smoke prediction from the registry", True, f"{target.uri} loaded and answered"))
    if allow_regression and champion is not None:
        note = f"comparison with champion v{champion.version} skipped on request (override)"
        decision = dataclasses.replace(decision, champion_version=champion.version, notes=decision.notes + (note,))
    with mlflow.start_run(run_name=f"promote-v{target.version}") as run:
        mlflow.set_tags({"kind": "manual-promotion", "target_version": target.version})
        mlflow.log_metrics(metrics.flat())
    reason = "manual: " + "; ".join(decision.reasons)
    if decision.promote:  # only a version that passed these checks gets the verdict the service requires
        registry.record_verdict(client, settings.model_name, target.version, hashes)
    if recheck:  # it stays where it is: only its verdict was missing
        _log_decision(client, run.info.run_id, decision)
        log.info("champion v%s re-checked: %s", target.version, "passed" if decision.promote else "failed")
        return Outcome(decision, target, registry.get_alias(client, settings.model_name))
    decision = _move_champion(client, settings, target.version, decision, reason, run.info.run_id)
    if not decision.promote and target.verdict != registry.PROMOTE:  # the champion moved meanwhile: not passed after all
        client.set_model_version_tag(settings.model_name, target.version, registry.VERDICT_TAG, "reject")
    return Outcome(decision, target, registry.get_alias(client, settings.model_name))


def rollback(settings: Settings, params: Params) -> Outcome:
    """Move ``champion`` back to ``previous-champion``: floors and smoke check apply, the comparison does not."""
    previous = registry.get_alias(registry.connect(settings), settings.model_name, registry.PREVIOUS)
    if previous is None:
        raise registry.PromotionError("there is no previous champion to roll back to")
    return override(settings, params, previous.version, allow_regression=True)


def status(settings: Settings, show_all: bool = False) -> dict[str, Any]:
    """The champion and the previous one; with ``show_all`` every version and the promotion history."""
    client = registry.connect(settings)
    champion = registry.get_alias(client, settings.model_name)
    previous = registry.get_alias(client, settings.model_name, registry.PREVIOUS)
    challenger = registry.get_alias(client, settings.model_name, registry.CHALLENGER)
    report: dict[str, Any] = {
        "model_name": settings.model_name,
        "champion": champion.to_dict() if champion else None,
        "previous_champion": previous.version if previous else None,
        "challenger": _challenger(settings, challenger) if challenger else None,
    }
    if show_all:
        report["versions"] = [v.to_dict() for v in registry.list_versions(client, settings.model_name)]
        report["promotion_history"] = registry.promotion_history(client, settings.model_name)
    return report


def _challenger(settings: Settings, challenger: registry.ModelRef) -> dict[str, Any]:
    """The challenger, and how it did in the shadows: agreement with the served answers, accuracy on feedback."""
    from app import feedback
    from pipeline import prediction_log

    try:
        live = prediction_log.shadow_comparison(feedback.open_log(settings), challenger.version)
    except prediction_log.PredictionLogError as err:
        live = {"problem": str(err)}
    return {**challenger.to_dict(), "live": live}


def shadow(settings: Settings, version: str | None) -> registry.ModelRef | None:
    """Run ``version`` in the shadows of the champion (``challenger`` alias), or stop with None. No gate: it answers nobody."""
    return registry.set_challenger(registry.connect(settings), settings, version)


def _move_champion(
    client: MlflowClient, settings: Settings, version: str, decision: GateDecision, reason: str, run_id: str
) -> GateDecision:
    """The one way ``champion`` moves: only on a passing decision, under the registry's lock; the decision is logged."""
    if decision.promote:
        try:
            registry.move_champion(client, settings, version, decision.champion_version, reason, run_id)
        except registry.PromotionError as err:
            decision = decision.with_check(Check("champion unchanged since comparison", False, str(err)))
    _log_decision(client, run_id, decision)
    return decision


def _smoke_check(model_uri: str, dataset: Dataset, expected: tuple[int, ...]) -> Check:
    try:
        from pipeline.train import compiled_predictor

        probabilities, digits = predict_classes(compiled_predictor(registry.load_keras(model_uri)), dataset.x_test[:SMOKE_IMAGES])
    except Exception as err:  # any failure to load or answer is the finding
        return Check("smoke prediction from the registry", False, f"{model_uri} failed: {type(err).__name__}: {err}")
    ok = probabilities.shape == (len(expected), 10) and bool(np.isfinite(probabilities).all()) and tuple(digits) == expected
    detail = (
        f"{model_uri} answered {len(digits)} test images like the trained model"
        if ok
        else f"{model_uri} answers differ from the trained model's: {tuple(digits)[:8]} vs {expected[:8]}"
    )
    return Check("smoke prediction from the registry", ok, detail)


def _log_decision(client: MlflowClient, run_id: str, decision: GateDecision) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "gate_decision.json").write_text(json.dumps(decision.to_dict(), indent=2))
        Path(tmp, "gate_decision.md").write_text(decision.to_markdown())
        client.log_artifacts(run_id, tmp, "gate")
    client.set_tag(run_id, "gate", "promote" if decision.promote else "reject")
    client.set_tag(run_id, "gate_reasons", "; ".join(decision.reasons)[:4000])
