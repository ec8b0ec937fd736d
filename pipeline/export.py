"""The served forms of a model: its TensorFlow Lite exports, checked to answer like the Keras model.

The service answers single images through LiteRT's interpreter, which runs in the calling thread,
while TensorFlow's thread pools have to wake up for every call. Float32 batches run at the same
speed either way: the arithmetic is the limit. The int8 export does it in 8-bit integers, faster;
it is served only when it gives the Keras model's digit on every test image.
"""

from __future__ import annotations

import contextlib
import io
import threading
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import keras

# where the export lives among a training run's artifacts
TFLITE_ARTIFACT_DIR = "serving"
TFLITE_FILE = "model.tflite"
INT8_FILE = "model-int8.tflite"
# what the service can run, fastest first, and the export file of each (Keras needs none)
RUNTIME_FILES = {"tflite-int8": INT8_FILE, "tflite": TFLITE_FILE}
AGREEMENT_FILES = {"tflite-int8": "agreement-int8.json", "tflite": "agreement.json"}
# the version's temperature and unsure threshold (``pipeline.calibration``), kept beside its exports
CALIBRATION_FILE = "calibration.json"
# training images that set the int8 export's value ranges; with fewer, more test digits change
CALIBRATION_IMAGES = 500
# larger batches run in slices of this many images, so that their activations stay in the CPU caches
SLICE = 16
# ops the int8 export runs in float: the probabilities people read and act on are never quantised
FLOAT_OPS = ("SOFTMAX",)
# float32 kernels differ in the order of their sums: far below this, and never in a digit
MAX_PROBABILITY_DIFFERENCE = 1e-4


@dataclass(frozen=True)
class Agreement:
    """How the export's answers compare with the Keras model's on the same images."""

    images: int
    same_digits: int
    max_probability_difference: float
    # None: only the digits must agree (int8 rounds every activation, so probabilities move by a few points)
    probability_limit: float | None = MAX_PROBABILITY_DIFFERENCE

    @property
    def ok(self) -> bool:
        close = self.probability_limit is None or self.max_probability_difference <= self.probability_limit
        return self.same_digits == self.images and close

    def summary(self) -> str:
        limit = "only digits must agree" if self.probability_limit is None else f"limit {self.probability_limit:.0e}"
        return (
            f"the same digit on {self.same_digits:,} of {self.images:,} images, "
            f"probabilities within {self.max_probability_difference:.1e} ({limit})"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def to_tflite(model: keras.Model, calibration: np.ndarray | None = None) -> bytes:
    """The Keras model as a TensorFlow Lite flatbuffer.

    Float32 by default: the same answers as Keras. With ``calibration`` images (normalised), weights
    and activations are quantised to int8 up to the logits, and the softmax runs in float: faster,
    with probabilities a few points off but not rounded to a grid, and, for some models, a different
    digit on some images (see ``log_tflite_exports``).
    """
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    # the converter prints the SavedModel it writes on the way; that says nothing to our users
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if calibration is None:
            return converter.convert()
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([image[None]] for image in calibration)
        converter.inference_output_type = tf.float32
        # an int8 softmax rounds probabilities to steps of 1/256: every clear digit would read 0.996, right
        # or wrong. Left out of quantisation, the softmax runs in float on the dequantised logits.
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter,
            debug_dataset=converter.representative_dataset,
            debug_options=tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(FLOAT_OPS)),
        )
        return debugger.get_nondebug_quantized_model()


def tflite_predictor(content: bytes, threads: int = 1) -> Callable[[np.ndarray], np.ndarray]:
    """A function of normalised images (n, 28, 28, 1) -> probabilities (n, 10), through LiteRT.

    One interpreter, resized when the batch size changes; a lock makes calls from several threads take
    turns, since an interpreter holds its tensors between calls.
    """
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content, num_threads=threads)
    source = interpreter.get_input_details()[0]["index"]
    target = interpreter.get_output_details()[0]["index"]
    lock = threading.Lock()
    planned: int | None = None  # the batch size the interpreter's tensors are allocated for

    def run(x: np.ndarray) -> np.ndarray:
        nonlocal planned
        if planned != len(x):
            interpreter.resize_tensor_input(source, list(x.shape))
            interpreter.allocate_tensors()
            planned = len(x)
        interpreter.set_tensor(source, x)
        interpreter.invoke()
        return interpreter.get_tensor(target)  # a copy: the next call cannot overwrite it

    def predict(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        with lock:
            if len(x) <= SLICE:
                return run(x)
            return np.concatenate([run(x[i : i + SLICE]) for i in range(0, len(x), SLICE)])

    return predict


def agreement(
    expected: np.ndarray, actual: np.ndarray, probability_limit: float | None = MAX_PROBABILITY_DIFFERENCE
) -> Agreement:
    """Compare two sets of probabilities (n, 10) for the same images."""
    if expected.shape != actual.shape:
        raise ValueError(f"cannot compare probabilities of shapes {expected.shape} and {actual.shape}")
    return Agreement(
        images=len(expected),
        same_digits=int((expected.argmax(axis=1) == actual.argmax(axis=1)).sum()),
        max_probability_difference=float(np.abs(expected - actual).max()) if len(expected) else 0.0,
        probability_limit=probability_limit,
    )


def log_tflite_exports(
    model: keras.Model,
    images: np.ndarray,
    probabilities: np.ndarray,
    calibration: np.ndarray | None = None,
    threads: int = 1,
) -> dict[str, Agreement]:
    """Convert ``model``, compare on ``images`` with the Keras ``probabilities``; log into the active MLflow run.

    Always the float32 export (``serving/model.tflite``, kept when its probabilities agree within
    ``MAX_PROBABILITY_DIFFERENCE``); with ``calibration`` training images (pixels 0-255, as stored)
    also the int8 export (``serving/model-int8.tflite``, kept when it gives the same digit on every
    image). Each gets its check (``serving/agreement.json``, ``serving/agreement-int8.json``) and its
    largest probability difference as a metric; the tag ``serving_runtime`` names the fastest one
    kept, which is what the service runs (``keras`` when none is). Returns the checks by runtime.
    """
    import tempfile
    from pathlib import Path

    import mlflow

    from pipeline.preprocess import to_model_input

    inputs = to_model_input(images)
    # runtime -> (export, the largest probability difference it may show)
    exports = {"tflite": (to_tflite(model), MAX_PROBABILITY_DIFFERENCE)}
    if calibration is not None:
        exports["tflite-int8"] = (to_tflite(model, calibration=to_model_input(calibration)), None)
    checks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for runtime, (content, limit) in exports.items():
            check = checks[runtime] = agreement(probabilities, tflite_predictor(content, threads)(inputs), limit)
            mlflow.log_dict(check.to_dict(), f"{TFLITE_ARTIFACT_DIR}/{AGREEMENT_FILES[runtime]}")
            mlflow.log_metric(f"{runtime.replace('-', '_')}_max_probability_difference", check.max_probability_difference)
            if check.ok:
                path = Path(tmp, RUNTIME_FILES[runtime])
                path.write_bytes(content)
                mlflow.log_artifact(str(path), TFLITE_ARTIFACT_DIR)
    served = next((runtime for runtime in RUNTIME_FILES if runtime in checks and checks[runtime].ok), "keras")
    mlflow.set_tag("serving_runtime", served)
    return checks
