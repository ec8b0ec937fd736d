"""Model card use cases: write a registered version's card from what its run logged, and export it.

The card (``pipeline.model_card``) goes two places at registration: the model version's description
in the MLflow registry (short markdown, shown on the model page) and the run's ``model_card/``
artifacts (the full HTML page with the plots, and its markdown): the card as registered.
``digits card`` and the service's ``GET /model/card`` render it again from the run and the version's
tags (``pipeline.card_store``), so that they also show what happened since, and versions registered
before cards existed get one.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import card_store, model_card, registry
from pipeline.card_store import CARD_DIR, card_link, gather, ui_address
from pipeline.settings import Settings

if TYPE_CHECKING:
    from pipeline.model_card import CardFacts

log = logging.getLogger(__name__)


def write(settings: Settings, version: str) -> CardFacts:
    """Render the version's card and store it: the version's description, and the HTML and markdown in its run."""
    client = registry.connect(settings)
    facts, images = gather(client, settings.model_name, version)
    description = model_card.to_markdown(facts, card_url=card_link(facts))
    page = model_card.to_html(facts, images, ui_address(settings))
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "model_card.html").write_text(page)
        Path(tmp, "model_card.md").write_text(model_card.to_markdown(facts, ui_address(settings), limit=10**6))
        client.log_artifacts(facts.run_id, tmp, CARD_DIR)
    client.update_model_version(settings.model_name, facts.version, description=description)
    log.info("model card of v%s: the version's description and %s in run %s", facts.version, card_store.CARD_HTML, facts.run_id)
    return facts


def write_at_registration(settings: Settings, version: str) -> None:
    """``write``, as bookkeeping of a registration: a failure is logged and the registration stands."""
    try:
        write(settings, version)
    except Exception as err:  # the card describes the version; it must not undo its registration
        log.warning("could not write the model card of v%s: %s: %s", version, type(err).__name__, err)


def export(settings: Settings, version: str | None = None, out: Path | None = None) -> Path:
    """``digits card``: the HTML card written to ``out`` (default: reports/cards/<model>-v<version>.html)."""
    ref, page = card_store.card_html(settings, version)
    path = out or settings.reports_dir / "cards" / f"{ref.model_name}-v{ref.version}.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path
