"""Which form of a registered version answers: its int8 export, its float32 export or Keras.

Real MLflow store, real LiteRT exports of a CNN trained on a slice of real MNIST; the exports are
logged into the version's run as the flow logs the ones it keeps.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.integration.serving_fixtures import log_model, register_and_promote, trained_model, using_store

pytestmark = pytest.mark.integration


def test_the_fastest_export_a_run_kept_answers(tmp_path, mnist_slice):
    import mlflow

    from pipeline import export, registry
    from pipeline.preprocess import to_model_input
    from pipeline.settings import get_settings
    from pipeline.train import compiled_predictor
    from serving.champion import load

    model, accuracy = trained_model(mnist_slice, seed=42)
    pixels = mnist_slice.x_test
    expected = compiled_predictor(model)(to_model_input(pixels))
    int8 = export.to_tflite(model, calibration=to_model_input(mnist_slice.x_train[: export.CALIBRATION_IMAGES]))
    with using_store(tmp_path):
        client = registry.connect(get_settings())
        run_id, uri = log_model(model, mnist_slice, accuracy)  # with the float32 export
        with mlflow.start_run(run_id=run_id):
            (tmp_path / export.INT8_FILE).write_bytes(int8)
            mlflow.log_artifact(str(tmp_path / export.INT8_FILE), export.TFLITE_ARTIFACT_DIR)
        exported = registry.get_version(client, get_settings().model_name, register_and_promote(run_id, uri))
        bare_run, bare_uri = log_model(model, mnist_slice, accuracy, tflite=False)
        bare = registry.get_version(client, get_settings().model_name, register_and_promote(bare_run, bare_uri))

        served = {runtime: load(exported, runtime) for runtime in ("tflite-int8", "tflite", "keras")}
        assert {allowed: loaded.runtime for allowed, loaded in served.items()} == {
            "tflite-int8": "tflite-int8",
            "tflite": "tflite",
            "keras": "keras",
        }
        # without exports every setting falls back to Keras
        assert {load(bare, runtime).runtime for runtime in ("tflite-int8", "tflite")} == {"keras"}

    answers = {runtime: loaded.probabilities(pixels) for runtime, loaded in served.items()}
    np.testing.assert_allclose(answers["tflite"], expected, atol=export.MAX_PROBABILITY_DIFFERENCE)
    np.testing.assert_allclose(answers["keras"], expected, atol=export.MAX_PROBABILITY_DIFFERENCE)
    # int8 is another model: probabilities a few points off, the same digit wherever Keras is clear
    int8_answers = answers["tflite-int8"]
    assert not np.allclose(int8_answers, expected, atol=export.MAX_PROBABILITY_DIFFERENCE)
    top_two = np.sort(expected, axis=1)[:, -2:]
    clear = top_two[:, 1] - top_two[:, 0] > 0.2
    assert clear.sum() > len(pixels) / 2, f"{clear.sum()} of {len(pixels)}"
    assert (int8_answers.argmax(axis=1)[clear] == expected.argmax(axis=1)[clear]).all()
    assert np.abs(int8_answers - expected).max() < 0.2
    # its probabilities are not rounded to steps of 1/256 (an int8 softmax made every clear digit 255/256)
    top = int8_answers.max(axis=1)
    assert len(np.unique(top)) > len(pixels) / 2, f"{len(np.unique(top))} distinct top probabilities of {len(pixels)}"
    assert (top == np.float32(255 / 256)).mean() < 0.05
    assert (np.abs(top * 256 - np.round(top * 256)) > 1e-3).mean() > 0.5


def test_a_version_is_served_with_the_calibration_its_run_fitted(tmp_path, mnist_slice):
    import mlflow

    from pipeline import export, registry
    from pipeline.calibration import Calibration, with_temperature
    from pipeline.preprocess import to_model_input
    from pipeline.settings import get_settings
    from pipeline.train import compiled_predictor
    from serving.champion import load

    model, accuracy = trained_model(mnist_slice, seed=42)
    pixels = mnist_slice.x_test[:200]
    expected = compiled_predictor(model)(to_model_input(pixels))
    calibration = Calibration(temperature=2.0, threshold=0.7, max_confident_error=0.002, images=100)
    with using_store(tmp_path):
        client = registry.connect(get_settings())
        run_id, uri = log_model(model, mnist_slice, accuracy)
        with mlflow.start_run(run_id=run_id):
            mlflow.log_dict(calibration.to_dict(), f"{export.TFLITE_ARTIFACT_DIR}/{export.CALIBRATION_FILE}")
        calibrated = load(registry.get_version(client, get_settings().model_name, register_and_promote(run_id, uri)), "tflite")
        bare_run, bare_uri = log_model(model, mnist_slice, accuracy)
        bare = load(registry.get_version(client, get_settings().model_name, register_and_promote(bare_run, bare_uri)), "tflite")

    assert (calibrated.calibrated, calibrated.unsure_threshold) == (True, 0.7)
    assert (bare.calibrated, bare.unsure_threshold) == (False, 0.9)
    served = calibrated.probabilities(pixels)
    np.testing.assert_allclose(served, with_temperature(expected, 2.0), atol=1e-3)
    np.testing.assert_allclose(bare.probabilities(pixels), expected, atol=export.MAX_PROBABILITY_DIFFERENCE)
    answers = calibrated.answers(pixels)
    assert [a["unsure"] for a in answers] == (served.max(axis=1) < 0.7).tolist()
    assert any(a["unsure"] for a in answers) and not all(a["unsure"] for a in answers)
