"""`dvc repro` runs the same steps as the flow; `digits ui` shows them in a real browser."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from pipeline import registry
from pipeline.settings import get_settings

pytestmark = pytest.mark.integration

VENV_BIN = str(Path(sys.executable).parent)


def _env(project: Path) -> dict[str, str]:
    return {**os.environ, "DIGITS_HOME": str(project), "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}


CODE = ("pipeline", "app", "cli")  # what the stages run, and so depend on


def _with_dvc_stages(project: Path) -> None:
    import shutil

    (project / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    (project / ".dvcignore").write_text((REPO / ".dvcignore").read_text())
    for folder in CODE:
        shutil.copytree(REPO / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__"))


def _dvc_status(project: Path) -> str:
    status = subprocess.run([f"{VENV_BIN}/dvc", "status"], cwd=project, env=_env(project), capture_output=True, text=True)
    return status.stdout + status.stderr


def test_dvc_repro_validates_trains_and_promotes(project):
    _with_dvc_stages(project)
    subprocess.run([f"{VENV_BIN}/digits", "data", "ingest"], cwd=project, env=_env(project), check=True, capture_output=True)
    repro = subprocess.run([f"{VENV_BIN}/dvc", "repro"], cwd=project, env=_env(project), capture_output=True, text=True)
    assert repro.returncode == 0, repro.stdout + repro.stderr
    assert (project / "reports" / "validation" / "data_docs" / "index.html").exists()
    candidate = json.loads((project / "reports" / "candidate.json").read_text())
    decision = json.loads((project / "reports" / "gate.json").read_text())
    assert decision["promote"], decision["reasons"]
    champion = registry.get_alias(registry.connect(get_settings()), get_settings().model_name)
    assert champion.version == "1" and champion.run_id == candidate["run_id"]

    # nothing changed: nothing to reproduce
    again = subprocess.run([f"{VENV_BIN}/dvc", "repro"], cwd=project, env=_env(project), capture_output=True, text=True)
    assert again.returncode == 0 and "didn't change, skipping" in again.stdout + again.stderr

    # a change to the preprocessing is a change to every stage that runs it
    with (project / "pipeline" / "preprocess.py").open("a") as code:
        code.write("\n# changed\n")
    status = _dvc_status(project)
    assert all(f"{stage}:" in status for stage in ("validate", "train", "promote")), status
    assert "modified:" in status and "pipeline" in status, status


def test_mlflow_ui_shows_the_run_its_data_version_and_the_champion(project, browser, prefect_engine):
    from conftest import bound_port, wait_for_http
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    from flows.retrain import retrain

    _with_dvc_stages(project)
    summary = retrain()
    assert summary["promoted"], summary["reasons"]
    # the flow ran the same steps as the DVC stages and recorded them
    assert "Data and pipelines are up to date" in _dvc_status(project)
    ui = subprocess.Popen(
        [f"{VENV_BIN}/digits", "ui", "--port", "0"],  # the MLflow server binds a free port itself
        cwd=project,
        env=_env(project),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{bound_port(ui, '/health')}"
        wait_for_http(f"{base}/health", ui)
        wait = WebDriverWait(browser, 60)
        client = registry.connect(get_settings())
        experiment = client.get_experiment_by_name(get_settings().experiment).experiment_id

        browser.get(f"{base}/#/experiments/{experiment}/runs/{summary['run_id']}")
        wait.until(seen.text_to_be_present_in_element((By.TAG_NAME, "body"), "retrain-"))
        wait.until(seen.text_to_be_present_in_element((By.TAG_NAME, "body"), "data_version"))
        assert summary["data_version"][:12] in browser.find_element(By.TAG_NAME, "body").text

        browser.get(f"{base}/#/experiments/{experiment}/runs/{summary['run_id']}/artifacts")
        wait.until(seen.text_to_be_present_in_element((By.TAG_NAME, "body"), "validation_report"))
        assert "plots" in browser.find_element(By.TAG_NAME, "body").text

        browser.get(f"{base}/#/models/{get_settings().model_name}")
        wait.until(seen.text_to_be_present_in_element((By.TAG_NAME, "body"), "champion"))
    finally:
        os.killpg(ui.pid, 15)
        ui.wait(timeout=30)
