"""Lineage and model cards after one real retrain (Prefect, MLflow sqlite store, DVC with a local remote).

The run lists its data versions as MLflow datasets; the registered version carries its card as its
description and as an HTML artifact; `digits card` writes it; the MLflow UI, the card and the service's
link to it are checked in headless Chromium. One trained project serves the whole module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import free_port, make_project, stop_process_group, wait_for_http

from pipeline import registry
from pipeline.settings import get_settings

pytestmark = [pytest.mark.integration]

VENV_BIN = str(Path(sys.executable).parent)
MODEL = "digits-cnn"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, slice_npz, prefect_engine):
    """One project, retrained once through the flow: (project folder, the flow's summary)."""
    from flows.retrain import retrain

    home = make_project(tmp_path_factory.mktemp("cards") / "project", slice_npz)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIGITS_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        get_settings.cache_clear()
        try:
            summary = retrain()
            assert summary["promoted"], summary["reasons"]
            yield home, summary
        finally:
            get_settings.cache_clear()


def _client():
    return registry.connect(get_settings())


def _inputs(run_id: str) -> dict[str, tuple]:
    run = _client().get_run(run_id)
    return {
        i.dataset.name: (i.dataset.digest, json.loads(i.dataset.source)["uri"], {t.key: t.value for t in i.tags}, i.dataset)
        for i in run.inputs.dataset_inputs
    }


def test_the_run_lists_the_data_versions_it_trained_and_was_evaluated_on(trained):
    from app.evaluation import suite_digest
    from pipeline.data import load_dataset
    from pipeline.params import load_params
    from pipeline.suite import FAMILY_NAMES

    home, summary = trained
    inputs = _inputs(summary["run_id"])
    assert set(inputs) == {"mnist-train", "mnist-test", "ood-suite"}  # no added images, no feedback in this version
    data_version = summary["data_version"]
    remote = (home / ".dvc-remote").resolve()  # data.dvc's remote: ../.dvc-remote from .dvc/
    for name, context in (("mnist-train", "training"), ("mnist-test", "evaluation")):
        digest, source, tags, _ = inputs[name]
        assert digest == data_version and tags["mlflow.data.context"] == context
        # the source is the version in the DVC remote, which `dvc push` filled
        assert source == str(remote / "files" / "md5" / data_version[:2] / data_version[2:]) and Path(source).is_file()
        assert tags["dvc_stored_in"] == "remote" and tags["dvc_files"].startswith(f"mnist/{name.split('-')[1]}_images.npy=")
    train_profile = json.loads(inputs["mnist-train"][3].profile)
    assert train_profile["features_shape"] == [3000, 28, 28]
    digest, _, tags, dataset = inputs["ood-suite"]
    settings = get_settings()
    params = load_params(settings.params_path)
    assert digest == suite_digest(params, load_dataset(settings.data_dir))[:32]
    assert tags["mlflow.data.context"] == "evaluation" and data_version in tags["rendered_from"]
    assert json.loads(dataset.profile)["features_shape"][0] == len(FAMILY_NAMES) * params.suite.size


def test_the_registered_version_carries_its_card(trained, tmp_path):
    from typer.testing import CliRunner

    from cli.main import digits

    home, summary = trained
    client = _client()
    version = client.get_model_version(MODEL, "1")
    description = version.description
    assert description.startswith(f"# Model card: {MODEL} v1\n") and len(description) <= 5000
    for part in ("## Data", "## Gate decision", "## Known limits", summary["data_version"], "digits retrain --set"):
        assert part in description, part
    assert f"#/experiments/{client.get_run(summary['run_id']).info.experiment_id}/runs/{summary['run_id']}" in description
    assert "[validation report](" in description and "validation_report/" in description
    artifacts = {a.path for a in client.list_artifacts(summary["run_id"], "model_card")}
    assert {"model_card/model_card.html", "model_card/model_card.md"} <= artifacts

    result = CliRunner().invoke(digits, ["card"])  # the champion's
    assert result.exit_code == 0, result.output
    written = Path(result.output.strip().splitlines()[-1])
    assert written == home / "reports" / "cards" / f"{MODEL}-v1.html"
    page = written.read_text()
    assert page.count('src="data:image/png;base64,') >= 6 and 'data-plot="suite_mistakes.png"' in page
    assert 'data-plot="mistakes_explained.png"' in page  # the mistakes with where their ink counted
    assert "<th>precision</th>" in page and "<strong>promoted</strong>" in page

    out = tmp_path / "card.html"
    assert CliRunner().invoke(digits, ["card", "1", "--out", str(out)]).exit_code == 0 and out.read_text() == page
    missing = CliRunner().invoke(digits, ["card", "7"])
    assert missing.exit_code == 1 and "has no version 7" in missing.output


def _images_loaded(browser) -> list:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(lambda b: b.execute_script("return Array.from(document.images).every(i => i.complete)"))
    return browser.execute_script("return Array.from(document.images).map(i => i.naturalWidth)")


def test_the_mlflow_ui_shows_the_datasets_and_the_card_and_the_card_renders(trained, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    home, summary = trained
    port = free_port()
    env = {**os.environ, "DIGITS_HOME": str(home), "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    ui = subprocess.Popen(
        [f"{VENV_BIN}/digits", "ui", "--port", str(port)],
        cwd=home,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base}/health", ui)
        wait = WebDriverWait(browser, 60)
        experiment = _client().get_run(summary["run_id"]).info.experiment_id
        browser.get(f"{base}/#/experiments/{experiment}/runs/{summary['run_id']}")
        # the run's "Datasets": the first input with its digest and context, and how many more
        listed = f"mnist-train ({summary['data_version']})"
        wait.until(seen.text_to_be_present_in_element((By.TAG_NAME, "body"), listed))
        body = browser.find_element(By.TAG_NAME, "body").text
        assert "Training" in body and "+2" in body

        browser.get(f"{base}/#/models/{MODEL}/versions/1")
        wait.until(seen.text_to_be_present_in_element((By.TAG_NAME, "body"), f"Model card: {MODEL} v1"))
        body = browser.find_element(By.TAG_NAME, "body").text
        assert "Known limits" in body and "Gate decision" in body
    finally:
        stop_process_group(ui)

    card = home / "reports" / "cards" / f"{MODEL}-v1.html"
    browser.get(card.as_uri())
    widths = _images_loaded(browser)
    assert len(widths) >= 6 and all(width > 0 for width in widths), widths
    assert f"Model card: {MODEL} v1" in browser.find_element(By.TAG_NAME, "h1").text


def test_the_service_links_the_card_and_serves_it(trained, browser):
    from selenium.webdriver.common.by import By

    from tests.integration.serving_fixtures import Server

    home, _ = trained
    with Server(home, extra_env={"DIGITS_LOG_ENABLED": "false"}) as server:
        server.wait("/readyz", timeout=240)
        info = httpx.get(server.url + "/model", timeout=30).json()
        assert info["model_version"] == "1" and info["model_card"] == "/model/card"
        answer = httpx.get(server.url + info["model_card"], timeout=60)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
        # its own policy: inline style and embedded images, and no script at all
        policy = answer.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src" not in policy and "img-src data:" in policy
        assert f"Model card: {MODEL} v1" in answer.text

        browser.get(server.url + "/draw")
        link = browser.find_element(By.ID, "model-card")
        assert link.text == "model card" and link.get_attribute("href") == server.url + "/model/card"
        link.click()
        widths = _images_loaded(browser)
        assert len(widths) >= 6 and all(width > 0 for width in widths), widths
        # the page's style applies under that policy
        style = browser.execute_script("return getComputedStyle(document.querySelector('table')).borderCollapse")
        assert style == "collapse"


def test_a_version_the_remote_lacks_is_located_in_the_cache(project):
    import numpy as np

    from pipeline import lineage, versioning

    folder = project / "data" / "mnist"
    folder.mkdir(parents=True)
    for name in ("train_images", "test_images"):
        np.save(folder / f"{name}.npy", np.zeros((2, 28, 28), np.uint8))
    version = versioning.record(project, project / "data", push=False)
    cached = lineage.stored_version(project, version.md5)
    assert cached.stored_in == "cache" and Path(cached.location).is_file()
    assert set(cached.files) == {"mnist/train_images.npy", "mnist/test_images.npy"}
    assert versioning.record(project, project / "data", push=True).pushed
    pushed = lineage.stored_version(project, version.md5)
    assert pushed.stored_in == "remote" and pushed.location.startswith(str((project / ".dvc-remote").resolve()))
    assert Path(pushed.location).is_file() and pushed.files == cached.files
