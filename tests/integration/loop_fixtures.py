"""Helpers for the tests of the loop: the project's champion answering into the project's prediction log."""

from __future__ import annotations

from datetime import timedelta

import numpy as np

from pipeline import prediction_log, registry
from pipeline.settings import get_settings


def champion_answers(images: np.ndarray, age: timedelta = timedelta(0)) -> list[str]:
    """The champion answers ``images`` as the service would (its served form); the answers go to the project's
    log as given ``age`` ago. Returns their request ids."""
    from pipeline.served import load

    settings = get_settings()
    model = load(registry.get_alias(registry.connect(settings), settings.model_name))
    writer = prediction_log.LogWriter(prediction_log.open_log(settings.prediction_log_url)).start()
    answers = model.answers(images.astype(np.float32))
    ids = [prediction_log.new_request_id() for _ in answers]
    at = prediction_log.utc_now() - age
    assert writer.submit(prediction_log.answered(ids, "pixels", answers, model.runtime, images, at=at)) == 0
    writer.close()
    return ids
