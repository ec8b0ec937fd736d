"""The same code on shared infrastructure: a real MLflow tracking server with a PostgreSQL backend
store, a served artifact store and basic auth, chosen by ``MLFLOW_TRACKING_URI`` (and the user's
``MLFLOW_TRACKING_USERNAME``/``PASSWORD``) alone.

The retraining flow (the real Prefect engine), ``digits status``, ``digits ui`` and the BentoML
service all work against the server; nothing is written to the project's embedded store.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from alembic.script import ScriptDirectory
from conftest import free_port
from typer.testing import CliRunner

from cli.main import digits
from pipeline import prediction_log, registry
from pipeline.settings import get_settings
from tests.conftest import TRAIN_IMAGES
from tests.integration.serving_fixtures import Server
from tests.integration.tracking_server import ADMIN, READER

# PostgreSQL, an MLflow server and three retrains through it: longer than the suite's timeout
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def on_server(project, infra, monkeypatch) -> Iterator[Path]:
    """The throw-away project, with MLFLOW_TRACKING_URI pointing at the tracking server, as its admin user."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", infra.server.url)
    for key, value in infra.server.credentials(ADMIN).items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    yield project
    get_settings.cache_clear()


def _digits(*args: str, cwd: Path, tracking_uri: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The installed `digits` command, configured by the environment only."""
    env = {**os.environ, "DIGITS_HOME": str(cwd), "MLFLOW_TRACKING_URI": tracking_uri}
    return subprocess.run([str(VENV_BIN / "digits"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _wait_for_version(service: Server, version: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = httpx.get(f"{service.url}/model", timeout=30)
        if info.status_code == 200 and info.json()["model_version"] == version:
            return info.json()
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the service did not serve v{version} within {timeout:.0f} s: {info.text}\n{service.log()[-3000:]}"
            )
        time.sleep(0.5)


def test_retrain_status_and_serving_through_the_tracking_server(
    on_server, infra, mnist, mnist_slice, prefect_engine, tmp_path, monkeypatch
):
    from flows.retrain import retrain

    project, server, postgres = on_server, infra.server, infra.postgres
    settings = get_settings()
    assert settings.tracking_server == server.url
    service_home = tmp_path / "service"  # the service needs no project folder, only the server
    service_home.mkdir()
    # the prediction log in PostgreSQL too, in a database of its own
    log_url = postgres.create_database("predictions")
    # the service boots (importing TensorFlow) while the flow trains, and finds the first champion on the server
    # the service reads the registry as the read-only user
    with Server(
        service_home, tracking_uri=server.url, extra_env={"DIGITS_LOG_DB_URL": log_url, **server.credentials(READER)}
    ) as service:
        summary = retrain()
        assert summary["promoted"], summary["reasons"]
        assert summary["registered_version"] == summary["champion_version"] == "1"
        run_id = summary["run_id"]

        # the run: finished, with its data version and per-epoch metrics, its artifacts stored by the server
        client = registry.connect(settings)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["data_version"] == summary["data_version"]
        assert len(client.get_metric_history(run_id, "loss")) == 3
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
        assert {"plots", "validation_report", "gate", "evaluation"} <= {a.path for a in client.list_artifacts(run_id)}
        downloads = tmp_path / "downloads"
        downloads.mkdir()
        decision = json.loads(Path(client.download_artifacts(run_id, "gate/gate_decision.json", str(downloads))).read_text())
        assert decision["promote"] is True and decision["champion_version"] is None
        png = Path(client.download_artifacts(run_id, "plots/confusion_matrix.png", str(downloads))).read_bytes()
        assert png.startswith(b"\x89PNG")
        stored = {path.name for path in server.artifacts.rglob("*") if path.is_file()}
        assert {"confusion_matrix.png", "gate_decision.json", "MLmodel", "index.html", "model.tflite"} <= stored
        # nothing went to the embedded store
        assert not (project / "mlflow" / "mlflow.db").exists() and not (project / "mlflow" / "artifacts").exists()

        # the registry lives in PostgreSQL: the champion alias, read straight from the database
        name = settings.model_name
        aliases = postgres.query(infra.database, f"SELECT alias, version FROM registered_model_aliases WHERE name = '{name}'")
        assert aliases == [("champion", 1)]
        assert postgres.query(infra.database, f"SELECT status FROM runs WHERE run_uuid = '{run_id}'") == [("FINISHED",)]
        champion = registry.get_alias(client, name)
        assert (champion.version, champion.run_id, champion.data_version) == ("1", run_id, summary["data_version"])
        assert champion.promoted_at and champion.metrics["test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-4)

        # `digits status`, configured by the environment alone (settings are read afresh)
        get_settings.cache_clear()
        status = CliRunner().invoke(digits, ["status", "--json", "--all"])
        assert status.exit_code == 0, status.output
        report = json.loads(status.stdout)
        assert report["champion"]["version"] == "1" and report["champion"]["run_id"] == run_id
        assert report["champion"]["data_version"] == summary["data_version"] and report["previous_champion"] is None
        assert [entry["version"] for entry in report["promotion_history"]] == ["1"]

        # the BentoML service serves that version, loaded through the server, and reads the test digits
        service.wait("/readyz", timeout=600)
        model = _wait_for_version(service, "1")
        assert model["run_id"] == run_id and model["data_version"] == summary["data_version"]
        # the fastest TensorFlow Lite export the run kept, downloaded through the server
        assert model["runtime"] == run.data.tags["serving_runtime"] and model["runtime"].startswith("tflite")
        response = httpx.post(f"{service.url}/predict_pixels", json={"pixels": mnist_slice.x_test.tolist()}, timeout=120)
        assert response.status_code == 200, response.text
        answers = response.json()
        assert {(a["model_version"], a["run_id"]) for a in answers} == {("1", run_id)}
        served_accuracy = float(np.mean([a["digit"] for a in answers] == mnist_slice.y_test))
        # the same model on the same test images as the flow's evaluation (batching may flip a near tie)
        assert served_accuracy == pytest.approx(summary["test_accuracy"], abs=2 / len(answers))

        # every answer is in PostgreSQL's prediction log, and a correction lands beside it
        assert httpx.get(f"{service.url}/model", timeout=30).json()["prediction_log"]["database"].startswith("postgresql")
        corrected = httpx.post(f"{service.url}/feedback", json={"request_id": answers[0]["request_id"], "label": 3}, timeout=30)
        assert corrected.status_code == 201, corrected.text
        logged = postgres.query("predictions", "SELECT count(*), count(DISTINCT request_id) FROM predictions")
        assert logged == [(len(answers), len(answers))]
        assert postgres.query("predictions", "SELECT label FROM feedback") == [(3,)]
        head = ScriptDirectory.from_config(prediction_log.alembic_config()).get_current_head()
        assert postgres.query("predictions", "SELECT version_num FROM alembic_version") == [(head,)]  # migrated to the latest

        # the compare-and-set against the server: a promotion that compared itself with no champion is refused
        source = client.get_model_version(name, "1").source
        second = registry.register(client, name, source, run_id, {"data_version": summary["data_version"]})
        assert second.version == "2"
        with pytest.raises(registry.PromotionError, match="champion moved"):
            registry.move_champion(client, settings, second.version, None, "compared with no champion")
        assert registry.get_alias(client, name).version == "1"
        # what a gated promotion records first: the service loads only a version with its verdict and hashes
        registry.record_verdict(client, name, second.version, registry.served_hashes(run_id, second.uri))
        registry.move_champion(client, settings, second.version, "1", "test: compared with v1", run_id)
        assert registry.get_alias(client, name).version == "2"
        assert registry.get_alias(client, name, registry.PREVIOUS).version == "1"
        # and the service follows the alias on the server
        assert _wait_for_version(service, "2")["run_id"] == run_id

        # basic auth: no credentials, no answer; the serving replicas' user reads the registry and changes nothing
        anonymous = httpx.get(f"{server.url}/api/2.0/mlflow/registered-models/alias", params={"name": name, "alias": "champion"})
        assert anonymous.status_code == 401
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        with monkeypatch.context() as as_reader:
            for key, value in server.credentials(READER).items():
                as_reader.setenv(key, value)
            reader = MlflowClient(server.url, server.url)
            assert reader.get_model_version_by_alias(name, "champion").version == "2"
            for forge in (
                lambda: reader.set_registered_model_alias(name, "champion", "1"),
                lambda: reader.set_model_version_tag(name, "1", registry.VERDICT_TAG, registry.PROMOTE),
            ):
                with pytest.raises(MlflowException, match="(?i)permission"):
                    forge()
        assert registry.get_alias(client, name).version == "2"

        # the loop on shared infrastructure: corrections of digits the slice never trained on, recorded in
        # PostgreSQL, become a data version, and the monitor retrains on them through the tracking server
        unseen = mnist.x_train[TRAIN_IMAGES : TRAIN_IMAGES + 30]
        fresh = httpx.post(f"{service.url}/predict_pixels", json={"pixels": unseen.tolist()}, timeout=120).json()
        for answer, label in zip(fresh, mnist.y_train[TRAIN_IMAGES : TRAIN_IMAGES + 30], strict=True):
            corrected = httpx.post(f"{service.url}/feedback", json={"request_id": answer["request_id"], "label": int(label)})
            assert corrected.status_code == 201, corrected.text
        monkeypatch.setenv("DIGITS_LOG_DB_URL", log_url)
        loop = yaml.safe_load((project / "params.yaml").read_text())
        loop["monitor"].update(min_predictions=100, min_feedback_to_retrain=10)
        loop["gate"].update(max_family_drop={})  # 20 images a family: one image is 5 points
        (project / "params.yaml").write_text(yaml.safe_dump(loop))
        get_settings.cache_clear()
        assert CliRunner().invoke(digits, ["feedback", "review", "--approve-all"]).exit_code == 0
        monitored = CliRunner().invoke(digits, ["monitor", "--window", "1h", "--retrain-when-needed", "--json"])
        assert monitored.exit_code == 0, monitored.output
        report = json.loads(monitored.stdout[monitored.stdout.index('{\n  "drift"') :])
        assert report["predictions"] == len(answers) + 30
        harvested = report["harvest"]
        assert harvested["added"]["train"] + harvested["added"]["test"] == 30
        # the first correction above was of an MNIST test image: rejected, it would leak the test set
        assert harvested["rejected_mnist_test_images"] == 1 and harvested["ready"] == 31
        third = report["retrain"]
        assert third["trigger"] in ("drift", "feedback") and third["data_version"] == harvested["data_version"]
        assert client.get_run(third["run_id"]).data.tags["trigger"] == third["trigger"]
        assert postgres.query("predictions", "SELECT count(*) FROM feedback WHERE harvested_at IS NOT NULL") == [(31,)]
        assert third["promoted"] and third["champion_version"] == "3", third["reasons"]
        assert _wait_for_version(service, "3")["run_id"] == third["run_id"]


def test_digits_ui_points_at_the_servers_ui(infra, tmp_path):
    server = infra.server
    # a local UI would never return (the timeout fails the test); this one names the server's and ends
    result = _digits("ui", "--port", "0", cwd=tmp_path, tracking_uri=server.url + "/", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"serves the MLflow UI: open {server.url}\n" in result.stdout
    assert not (tmp_path / "mlflow").exists()  # no local store either
    # the server's UI, behind its basic auth: the page and its application script (a browser test elsewhere clicks
    # through a UI)
    assert httpx.get(server.url + "/", timeout=30).status_code == 401
    page = httpx.get(server.url + "/", timeout=30, auth=(READER, server.passwords[READER]))
    assert page.status_code == 200 and "<title>MLflow</title>" in page.text, page.text[:500]
    script = re.search(r'src="(static-files/[^"]+\.js)"', page.text)
    assert script, page.text[:500]
    assert httpx.get(f"{server.url}/{script.group(1)}", timeout=60).status_code == 200

    # a server that does not answer is named, with what to do (a port nobody listens on)
    nobody = f"http://127.0.0.1:{free_port()}"
    result = _digits("ui", cwd=tmp_path, tracking_uri=nobody, timeout=300)
    assert result.returncode == 1
    assert f"the tracking server {nobody}, which does not answer" in result.stderr and "mlflow server" in result.stderr
