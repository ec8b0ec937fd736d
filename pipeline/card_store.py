"""Model cards in the MLflow store: what a registered version's run logged, and the card stored with it.

The card itself is rendered by ``pipeline.model_card`` (pure); ``app.cards`` writes it at registration.
The service renders a version's card through ``card_html`` (it ships ``pipeline`` and ``serving`` only).
"""

from __future__ import annotations

import json
import logging
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import model_card, registry
from pipeline.model_card import CardFacts, DataInput
from pipeline.settings import Settings

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

CARD_DIR = "model_card"
CARD_HTML = f"{CARD_DIR}/model_card.html"
CARD_MARKDOWN = f"{CARD_DIR}/model_card.md"
# where `digits ui` serves the MLflow UI of the embedded store
LOCAL_UI = "http://127.0.0.1:5000/"


def ui_address(settings: Settings) -> str:
    """The MLflow UI's address, for links from a card read outside it: the tracking server's, or `digits ui`'s."""
    return f"{settings.tracking_server}/" if settings.tracking_server else LOCAL_UI


def card_link(facts: CardFacts, ui: str = "") -> str:
    """The HTML card in the MLflow UI's artifact viewer (relative inside the UI when ``ui`` is '')."""
    return f"{ui}#/experiments/{facts.experiment_id}/runs/{facts.run_id}/artifacts/{CARD_HTML}"


def _read_json(folder: Path, path: str) -> Any:
    file = folder / path
    return json.loads(file.read_text()) if file.is_file() else None


def _listing(client: MlflowClient, run_id: str, *folders: str) -> set[str]:
    return {a.path for folder in folders for a in client.list_artifacts(run_id, folder)}


def _datasets(run) -> tuple[DataInput, ...]:
    out = []
    for item in run.inputs.dataset_inputs if run.inputs else []:
        tags = {t.key: t.value for t in item.tags}
        try:
            rows = json.loads(item.dataset.profile or "{}").get("features_shape", [None])[0]
            source = json.loads(item.dataset.source).get("uri", item.dataset.source)
        except (ValueError, AttributeError, IndexError):
            rows, source = None, item.dataset.source
        out.append(DataInput(item.dataset.name, tags.get("mlflow.data.context", "-"), item.dataset.digest, str(source), rows))
    return tuple(out)


def gather(client: MlflowClient, model_name: str, version: str) -> tuple[CardFacts, dict[str, bytes]]:
    """What the version's run logged, and its plots (PNG bytes by artifact path)."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version(model_name, str(version))
    except MlflowException:
        raise registry.PromotionError(f"{model_name} has no version {version}: see `digits status --all`") from None
    run_id = mv.run_id or (mv.tags or {}).get("source_run_id")
    if not run_id:
        raise registry.PromotionError(f"{model_name} v{version} names no run: there is nothing to write its card from")
    run = client.get_run(run_id)
    present = _listing(client, run_id, "", "validation_report")
    report = next((p for p in sorted(present) if p.startswith("validation_report/") and p.endswith("index.html")), None)
    created = mv.creation_timestamp
    registered = datetime.fromtimestamp(created / 1000, UTC).isoformat(timespec="seconds") if created else None
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp)
        # a folder at a time: one call each instead of one a file
        for path in ("params.json", "evaluation", "gate", "plots"):
            if path in present:
                client.download_artifacts(run_id, path, tmp)
        facts = CardFacts(
            model_name=model_name,
            version=str(mv.version),
            run_id=run_id,
            experiment_id=run.info.experiment_id,
            params=_read_json(local, "params.json") or _nested(run.data.params),
            metrics=dict(run.data.metrics),
            tags=dict(run.data.tags),
            version_tags=dict(mv.tags or {}),
            datasets=_datasets(run),
            per_class=_read_json(local, "evaluation/metrics.json"),
            suite=_read_json(local, "evaluation/suite.json"),
            gate=_read_json(local, "gate/gate_decision.json"),
            validation_report=report,
            registered_at=registered,
        )
        images = {path: (local / path).read_bytes() for path in model_card.PLOTS if (local / path).is_file()}
    return facts, images


def _nested(flat: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Dotted run params back into sections (values as logged, strings): for runs without params.json."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        section, _, name = key.partition(".")
        if name:
            out.setdefault(section, {})[name] = value
    return out


def card_html(settings: Settings, version: str | None = None) -> tuple[registry.ModelRef, str]:
    """A version's HTML card (default: the champion's), rendered now from its run and the version's tags.

    Rendered rather than read from the run's ``model_card/``: the card then shows what happened since
    registration too (a promotion, a rollback, a reproduction), and versions from before cards have one.
    """
    client = registry.store_client(settings)
    ref = (
        registry.get_version(client, settings.model_name, version) if version else registry.get_alias(client, settings.model_name)
    )
    if ref is None:
        raise registry.PromotionError("there is no champion yet: run `digits retrain`, or name a version")
    facts, images = gather(client, settings.model_name, ref.version)
    return ref, model_card.to_html(facts, images, ui_address(settings))
