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
    entries = [
        prediction_log.entry(prediction_log.new_request_id(), "pixels", answer, model.runtime, image)
        for answer, image in zip(model.answers(images.astype(np.float32)), images, strict=True)
    ]
    for item in entries:
        item["created_at"] -= age
    assert writer.submit(entries) == 0
    writer.close()
    return [e["request_id"] for e in entries]
