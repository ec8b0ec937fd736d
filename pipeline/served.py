"""A registered version as the service runs it: its fastest allowed export, its calibration, warmed.

The service, ``digits predict`` and the gate's scoring all load a version here, so that what the
gate measures is what clients get.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np

from pipeline.preprocess import SIDE, to_model_input

if TYPE_CHECKING:
    from pipeline.calibration import Calibration
    from pipeline.registry import ModelRef


@dataclass(frozen=True)
class LoadedModel:
    """A registered version, loaded and warmed, with its compiled predictor."""

    ref: ModelRef
    predictor: Callable[[np.ndarray], np.ndarray]
    runtime: str  # "tflite-int8" or "tflite" (the version's TensorFlow Lite exports), or "keras"
    loaded_at: str
    load_seconds: float
    # answers less confident than this are marked unsure (the version's calibration, else the service's default)
    unsure_threshold: float
    calibrated: bool = False  # the version has a calibration of its own: its temperature is applied, its threshold used

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 or float pixels (n, 28, 28) on the 0-255 scale -> calibrated softmax probabilities (n, 10)."""
        return np.asarray(self.predictor(to_model_input(pixels)), dtype=np.float64)

    def answers(self, pixels: np.ndarray) -> list[dict]:
        """One answer per image: digit, confidence, whether it is unsure, the ten probabilities, and who answered."""
        return [self.answer(row) for row in self.probabilities(pixels)]

    def answer(self, probabilities: np.ndarray) -> dict:
        digit = int(np.argmax(probabilities))
        return {
            "digit": digit,
            "confidence": round(float(probabilities[digit]), 6),
            "unsure": bool(probabilities[digit] < self.unsure_threshold),
            "probabilities": [round(float(p), 6) for p in probabilities],
            "model_name": self.ref.model_name,
            "model_version": self.ref.version,
            "run_id": self.ref.run_id,
        }

    def info(self) -> dict:
        return {
            **self.ref.to_dict(),
            "uri": self.ref.uri,
            "runtime": self.runtime,
            "unsure_threshold": self.unsure_threshold,
            "calibrated": self.calibrated,
            "loaded_at": self.loaded_at,
            "load_seconds": round(self.load_seconds, 3),
        }


def load(
    ref: ModelRef, runtime: str = "tflite-int8", threads: int = 1, unsure_threshold: float = 0.9, verify: bool = False
) -> LoadedModel:
    """Load one registered version (by version, not by alias) and warm it.

    ``runtime`` is the fastest allowed: with ``"tflite-int8"`` the version's int8 TensorFlow Lite
    export answers when its training run kept one (it gave the Keras model's digit on every test
    image), else its float32 export (the Keras model's probabilities within 1e-4), through LiteRT with
    ``threads`` threads; ``"tflite"`` starts at the float32 export. Without an export the Keras model
    answers, through a compiled ``tf.function``. The version's calibration (its run's
    ``serving/calibration.json``) sets the temperature its probabilities are served with and the
    threshold below which an answer is unsure; versions without one answer as they are, unsure below
    ``unsure_threshold``. Warming runs one image and batches, so the first requests after a swap are
    as fast as the rest.

    With ``verify`` (what the service and ``digits predict`` do with the champion) the version must
    carry the gate's "promote" verdict, and every file is checked against the hashes recorded at its
    promotion before it is used; ``IntegrityError`` otherwise, with nothing loaded.
    """
    from pipeline.registry import PROMOTE, IntegrityError

    started = time.perf_counter()
    expected = None
    if verify:
        if ref.verdict != PROMOTE:
            raise IntegrityError('it was not promoted through the gate (no "promote" verdict recorded on it)')
        if not ref.served_sha256:
            raise IntegrityError("no hashes of its served files were recorded when it was promoted")
        expected = ref.served_sha256
    predictor, runtime, calibration = run_predictor(ref.run_id, ref.uri, runtime, threads, expected)
    if calibration is not None:
        unsure_threshold = calibration.threshold
    for n in (1, 2, 3, 32):
        out = predictor(np.zeros((n, SIDE, SIDE, 1), dtype=np.float32))
        if out.shape != (n, 10) or not np.isfinite(out).all():
            raise ValueError(f"{ref.uri} answers shape {out.shape} for {n} images; expected ({n}, 10) probabilities")
    return LoadedModel(
        ref,
        predictor,
        runtime,
        datetime.now(UTC).isoformat(timespec="seconds"),
        time.perf_counter() - started,
        unsure_threshold,
        calibrated=calibration is not None,
    )


def run_predictor(
    run_id: str | None,
    model_uri: str,
    runtime: str = "tflite-int8",
    threads: int = 1,
    expected: dict[str, str] | None = None,
) -> tuple[Callable[[np.ndarray], np.ndarray], str, Calibration | None]:
    """A training run's model as served: (predictor of calibrated probabilities, runtime, calibration).

    The fastest export the run kept that ``runtime`` allows, else the Keras model at ``model_uri``.
    With ``expected`` (served file -> sha256, as recorded at promotion) only recorded files are used,
    each checked before use: a recorded file that is gone or changed raises ``IntegrityError``.
    """
    from pipeline.export import CALIBRATION_FILE, RUNTIME_FILES, TFLITE_ARTIFACT_DIR, tflite_predictor
    from pipeline.registry import (
        IntegrityError,
        check_served,
        describe_served,
        load_calibration,
        load_keras,
        load_keras_checked,
        load_tflite,
    )
    from pipeline.train import compiled_predictor

    def served(file: str) -> bytes | None:
        key = f"{TFLITE_ARTIFACT_DIR}/{file}"
        if expected is not None and key not in expected:
            return None  # not what the gate passed: never looked at
        content = load_tflite(run_id, file)
        if expected is not None:
            if content is None:
                raise IntegrityError(f"its {describe_served(key)}, which the gate passed, is missing")
            check_served(expected, key, content)
        return content

    runtimes = list(RUNTIME_FILES)  # fastest first
    allowed = runtimes[runtimes.index(runtime) :] if runtime in runtimes else []
    for candidate in allowed:
        if (content := served(RUNTIME_FILES[candidate])) is not None:
            predictor, runtime = tflite_predictor(content, threads), candidate
            break
    else:
        model = load_keras(model_uri) if expected is None else load_keras_checked(model_uri, expected)
        predictor, runtime = compiled_predictor(model), "keras"
    if expected is None:
        calibration = load_calibration(run_id)
    else:
        from pipeline.calibration import Calibration as Fitted

        content = served(CALIBRATION_FILE)
        calibration = None if content is None else Fitted.from_dict(json.loads(content))
    if calibration is not None:
        predictor = _with_calibration(predictor, calibration)
    return predictor, runtime, calibration


def _with_calibration(
    predictor: Callable[[np.ndarray], np.ndarray], calibration: Calibration
) -> Callable[[np.ndarray], np.ndarray]:
    """``predictor`` with the version's temperature applied: the probabilities the threshold was chosen on."""
    if calibration.temperature == 1.0:
        return predictor
    return lambda x: calibration.apply(predictor(x))
