"""What processes killed outright (``kill -9``, out of memory) left unfinished, put right before new work starts."""

from __future__ import annotations

import logging

from pipeline import registry, tracking
from pipeline.settings import Settings

log = logging.getLogger(__name__)


def recover(settings: Settings) -> list[str]:
    """Mark FAILED the runs whose process died, finish an interrupted promotion; a line about each thing done.

    Best effort: what cannot be done now is left for the next start (a promotion repairs first anyway).
    """
    done: list[str] = []
    try:
        done += tracking.mark_stale_runs(settings)
        repaired = registry.repair_promotion(registry.connect(settings), settings)
        done += [repaired] if repaired else []
    except Exception as err:  # the store or the lock is unreachable now: the retrain says so in its own steps
        log.warning("recovery at start not done (%s: %s); the next start tries again", type(err).__name__, err)
    return done
