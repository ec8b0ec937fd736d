"""A peer of the serving benchmark: the champion's TensorFlow Lite export behind BentoML, written the documented way.

Started by ``benchmarks/serving_latency.py`` (from the ``benchmarks/`` folder, with the project folder on
``PYTHONPATH``) as the service ``bentoml-documented``:

    bentoml serve documented_service:DocumentedDigitClassifier --working-dir benchmarks

What a user of this stack would write from BentoML's documentation instead of our service: one
``@bentoml.api(batchable=True)`` endpoint, so that BentoML's adaptive batching merges concurrent requests
into one call (its own dispatcher chooses the batch and the wait, within the default ``max_batch_size``
and ``max_latency_ms``), over a LiteRT interpreter of the same export the project serves (the int8 one when
the champion's run kept it, else the float32 one; the run's ``serving_runtime`` tag says which). No
prediction log, no integrity checks, no hot swap: the champion is loaded once at start.

``POST /predict_pixels`` takes ``{"pixels": (n, 28, 28) numbers 0-255}`` (a batchable endpoint concatenates
requests along the first axis, so a single image is sent as a batch of one) and answers a list of
``{"digit", "confidence", "probabilities", "model_name", "model_version", "run_id"}``. Only for
benchmarking; it is not part of the product.
"""

from __future__ import annotations

import bentoml
import numpy as np


@bentoml.service(name="digits-documented", workers=1, traffic={"timeout": 30})
class DocumentedDigitClassifier:
    """The champion's TensorFlow Lite export, batched by BentoML."""

    def __init__(self) -> None:
        from ai_edge_litert.interpreter import Interpreter

        from pipeline.export import RUNTIME_FILES, TFLITE_FILE
        from pipeline.registry import get_alias, load_tflite, store_client
        from pipeline.settings import get_settings

        settings = get_settings()
        client = store_client(settings)
        ref = get_alias(client, settings.model_name)
        if ref is None:
            raise RuntimeError(f"no champion for {settings.model_name}: run `digits retrain`, or point DIGITS_HOME at a project")
        runtime = client.get_run(ref.run_id).data.tags.get("serving_runtime", "tflite")
        content = load_tflite(ref.run_id, RUNTIME_FILES.get(runtime, TFLITE_FILE))
        if content is None:
            raise RuntimeError(f"v{ref.version}'s run has no TensorFlow Lite export")
        self.ref, self.runtime = ref, runtime
        self.interpreter = Interpreter(model_content=content, num_threads=1)
        self.input = self.interpreter.get_input_details()[0]["index"]
        self.output = self.interpreter.get_output_details()[0]["index"]
        self.allocated = 0

    # BentoML's defaults (batches of up to 100 images, up to 60 s of waiting): a smaller max_latency_ms answers 503
    # under 32 clients on this project's machines
    @bentoml.api(route="/predict_pixels", batchable=True)
    def predict_pixels(self, pixels: np.ndarray) -> list[dict]:
        """A batch (n, 28, 28) of 0-255 pixels -> one prediction per image."""
        x = (np.asarray(pixels, dtype=np.float32) / 255.0).reshape(-1, 28, 28, 1)
        if self.allocated != len(x):
            self.interpreter.resize_tensor_input(self.input, list(x.shape))
            self.interpreter.allocate_tensors()
            self.allocated = len(x)
        self.interpreter.set_tensor(self.input, x)
        self.interpreter.invoke()
        probabilities = self.interpreter.get_tensor(self.output).astype(np.float64)
        answers = []
        for row in probabilities:
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
