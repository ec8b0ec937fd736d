"""The naive baseline of the serving benchmark: the champion behind BentoML, ``model.predict`` per request.

Started by ``benchmarks/serving_latency.py`` (from the ``benchmarks/`` folder, with the project folder on
``PYTHONPATH``):

    bentoml serve naive_service:NaiveDigitClassifier --working-dir benchmarks

It loads the same model as the project's service (``models:/<name>@champion`` of the store that the
settings point at, as a Keras model through MLflow) and answers ``POST /predict_pixels`` with the same
JSON shapes: ``{"pixels": one 28x28 array or a batch (n, 28, 28), 0-255}`` -> a list of
``{"digit", "confidence", "probabilities", "model_name", "model_version", "run_id"}``.

What a first version typically looks like, and what the benchmark compares against: a synchronous
endpoint that calls Keras ``model.predict`` once per request, no batching across requests, no compiled
predictor, default threads and garbage collection, no input checks beyond the shape. Only for
benchmarking; it is not part of the product.
"""

from __future__ import annotations

import bentoml
import numpy as np


@bentoml.service(name="digits-naive", workers=1, traffic={"timeout": 30})
class NaiveDigitClassifier:
    """The champion, called with ``model.predict`` in each request."""

    def __init__(self) -> None:
        from pipeline.registry import get_alias, load_keras, store_client
        from pipeline.settings import get_settings

        settings = get_settings()
        ref = get_alias(store_client(settings), settings.model_name)
        if ref is None:
            raise RuntimeError(
                f"no champion for {settings.model_name} in {settings.resolved_tracking_uri}: "
                "run `digits retrain`, or point DIGITS_HOME at a project that has one"
            )
        self.ref = ref
        self.model = load_keras(ref.uri)
        # one call at start-up so that the first request does not also build Keras' predict function
        self.model.predict(np.zeros((1, 28, 28, 1), dtype=np.float32), verbose=0)

    @bentoml.api(route="/predict_pixels")
    def predict_pixels(self, pixels: np.ndarray) -> list[dict]:
        """One 28x28 array or a batch (n, 28, 28) of 0-255 pixels -> one prediction per image."""
        from pipeline.preprocess import to_model_input

        probabilities = self.model.predict(to_model_input(pixels), verbose=0)
        answers = []
        for row in np.asarray(probabilities, dtype=np.float64):
            digit = int(np.argmax(row))
            answers.append(
                {
                    "digit": digit,
                    "confidence": round(float(row[digit]), 6),
                    "probabilities": [round(float(p), 6) for p in row],
                    "model_name": self.ref.model_name,
                    "model_version": self.ref.version,
                    "run_id": self.ref.run_id,
                }
            )
        return answers
