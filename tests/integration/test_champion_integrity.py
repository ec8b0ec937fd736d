"""The service serves only what the gate passed: a real ``bentoml serve`` process and a real MLflow registry.

The ``champion`` alias is moved by hand, as anyone who can write to the registry could: to a version
registered without the gate, and to one whose served file was altered after its promotion. The
service keeps serving v1, stays ready, and ``/model`` says which version it refused and why.
"""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx
import pytest

from tests.integration.serving_fixtures import Server, log_model, register_and_promote, trained_model, using_store

pytestmark = pytest.mark.integration


def _model(http: httpx.Client) -> dict:
    return http.get("/model").json()


def _wait_until_settled(http: httpx.Client, version: str, timeout: float = 90.0) -> dict:
    """/model once the service has either swapped away from v1 or said something about ``version``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = _model(http)
        if info.get("model_version") != "1" or f"v{version}" in (info.get("problem") or ""):
            return info
        time.sleep(0.5)
    raise AssertionError(f"the service neither loaded nor refused v{version} in {timeout:.0f} s: {info}")


def _run_artifact(run_id: str, path: str) -> Path:
    """A run's artifact as a file in the project's artifact store (the embedded store keeps them on disk)."""
    from mlflow import MlflowClient

    uri = MlflowClient().get_run(run_id).info.artifact_uri
    return Path(unquote(urlparse(uri).path)) / path


def _backdoored_export(model) -> bytes:
    """A working TensorFlow Lite export of ``model`` with its last bias pushed towards 7: loads, answers, lies."""
    import keras
    import numpy as np

    from pipeline.export import to_tflite

    weights = model.get_weights()
    assert weights[-1].shape == (10,), [w.shape for w in weights]
    weights[-1] = weights[-1] + 20.0 * (np.arange(10) == 7)
    rogue = keras.models.clone_model(model)
    rogue.set_weights(weights)
    return to_tflite(rogue)


def test_the_service_keeps_its_champion_when_the_alias_names_an_unvetted_or_altered_version(tmp_path, mnist_slice):
    from mlflow import MlflowClient

    from pipeline import registry
    from pipeline.settings import get_settings

    home = tmp_path / "project"
    home.mkdir()
    model, accuracy = trained_model(mnist_slice, seed=42)
    with Server(home) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        with using_store(home):
            settings = get_settings()
            run_id, uri = log_model(model, mnist_slice, accuracy)
            assert register_and_promote(run_id, uri, "first champion") == "1"
            server.wait("/readyz", timeout=240)
            assert _model(http)["model_version"] == "1"
            client = MlflowClient()
            name = settings.model_name

            # v2: registered straight into the registry, never gated; the alias moved by hand
            run_id2, uri2 = log_model(model, mnist_slice, accuracy)
            unvetted = registry.register(client, name, uri2, run_id2, {"data_version": "test-data"})
            client.set_registered_model_alias(name, registry.CHAMPION, unvetted.version)
            info = _wait_until_settled(http, unvetted.version)
            assert info["model_version"] == "1", f"the service loaded v{info['model_version']}, which never passed the gate"
            assert "v2 refused" in info["problem"] and "not promoted through the gate" in info["problem"], info["problem"]
            assert "/" not in info["problem"].split("refused", 1)[1], info["problem"]  # no paths
            assert http.get("/readyz").status_code == 200
            assert "v2 refused" in server.log()

            # v3: passed and recorded like a promotion, then its served export altered in the artifact store
            run_id3, uri3 = log_model(model, mnist_slice, accuracy)
            altered = registry.register(client, name, uri3, run_id3, {"data_version": "test-data"})
            registry.record_verdict(client, name, altered.version, registry.served_hashes(run_id3, uri3))
            _run_artifact(run_id3, "serving/model.tflite").write_bytes(_backdoored_export(model))
            client.set_registered_model_alias(name, registry.CHAMPION, altered.version)
            info = _wait_until_settled(http, altered.version)
            assert info["model_version"] == "1", f"the service loaded v{info['model_version']}, whose export was altered"
            assert "v3 refused" in info["problem"] and "differs from the one the gate passed" in info["problem"], info["problem"]
            assert http.get("/readyz").status_code == 200

            # a real promotion afterwards is served as usual
            run_id4, uri4 = log_model(model, mnist_slice, accuracy)
            client.set_registered_model_alias(name, registry.CHAMPION, "1")
            good = register_and_promote(run_id4, uri4, "gated champion")
            deadline = time.monotonic() + 90
            while _model(http).get("model_version") != good and time.monotonic() < deadline:
                time.sleep(0.5)
            info = _model(http)
            assert info["model_version"] == good and info["problem"] is None, info
