"""The whole loop, end to end, on a slice of MNIST: serve v1 (a real `bentoml serve`), send photos, pixels and a
drawing (the drawing page in headless Chromium), correct the answers, then `digits monitor --retrain-when-needed`
flags the change, harvests the corrections into a data version and retrains on them; v2 passes the gate, the
running service swaps to it, and it reads the corrected kind of digit better than v1 did.

The photos are MNIST training digits the slice never trained on, drawn with thick strokes (the suite's `thick`
family), which v1 never saw: what people send that MNIST lacks.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from cli.main import digits
from pipeline import registry, suite
from pipeline.settings import get_settings
from tests.conftest import TRAIN_IMAGES
from tests.integration.serving_fixtures import Server

# two retrains, the monitor and a browser against a live service: longer than the suite's timeout
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_engine"), pytest.mark.timeout(1800)]

PHOTOS = 300


def _loop_params(project) -> None:
    """This project's thresholds for a window of a few hundred answers."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["monitor"].update(min_predictions=100, min_feedback_to_retrain=100)
    params["feedback"].update(train_weight=3)
    params["gate"].update(max_family_drop={})  # 20 images a family: one image is 5 points
    (project / "params.yaml").write_text(yaml.safe_dump(params))


def _photos(http: httpx.Client, family: suite.Family) -> list[dict]:
    answers = []
    for image in family.images:
        response = http.post("/predict", files={"image": ("photo.png", image, "image/png")})
        assert response.status_code == 200, response.text
        answers.append(response.json())
    return answers


def _draw_a_one_and_confirm_it(browser, url: str) -> str:
    """A vertical stroke on the drawing page, then "Right" or "Wrong, it was 1"; what the page said."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url + "/draw")
    WebDriverWait(browser, 30).until(lambda b: "digits-cnn v1" in b.find_element(By.ID, "model").text)
    stroke = ActionChains(browser, duration=10)
    stroke.move_to_element_with_offset(browser.find_element(By.ID, "pad"), 0, -95).click_and_hold()
    for _ in range(10):
        stroke.move_by_offset(0, 19)
    stroke.release().perform()
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "feedback").is_displayed())
    answered = browser.find_element(By.ID, "digit").text
    button = "#right" if answered == "1" else '#labels button[data-label="1"]'
    browser.find_element(By.CSS_SELECTOR, button).click()
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "feedback-status").text)
    return browser.find_element(By.ID, "feedback-status").text


def test_answers_corrections_monitor_retrain_and_a_better_champion(project, mnist, browser):
    from flows.retrain import retrain

    _loop_params(project)
    first = retrain()
    assert first["promoted"] and first["champion_version"] == "1", first["reasons"]
    unseen = slice(TRAIN_IMAGES, TRAIN_IMAGES + 2000)
    thick = suite.build_family("thick", mnist.x_train[unseen], mnist.y_train[unseen], PHOTOS)

    with Server(project) as service, httpx.Client(base_url=service.url, timeout=60) as http:
        service.wait("/readyz", timeout=300)
        before = _photos(http, thick)
        v1_right = sum(a["digit"] == label for a, label in zip(before, thick.labels, strict=True))
        plain = http.post("/predict_pixels", json={"pixels": mnist.x_train[TRAIN_IMAGES + 2000 :][:100].tolist()})
        assert plain.status_code == 200
        assert _draw_a_one_and_confirm_it(browser, service.url).startswith("Thank you: recorded")

        # people correct the photos; the held ones (against a confident answer) are checked by a person
        for answer, label in zip(before, thick.labels, strict=True):
            response = http.post("/feedback", json={"request_id": answer["request_id"], "label": int(label)})
            assert response.status_code == 201, response.text
        reviewed = CliRunner().invoke(digits, ["feedback", "review", "--approve-all"])
        assert reviewed.exit_code == 0, reviewed.output

        # the monitor sees the thick strokes, harvests the corrections and retrains on them
        result = CliRunner().invoke(digits, ["monitor", "--window", "1h", "--retrain-when-needed", "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout[result.stdout.index('{\n  "drift"') :])
        assert report["drift"] is True, report["verdict"]
        assert report["checks"]["input_statistics"]["drift"] is True
        assert report["harvest"]["data_version"] and report["harvest"]["added"]["train"] > 150
        second = report["retrain"]
        assert second["trigger"] == "drift" and second["data_version"] == report["harvest"]["data_version"]
        assert second["promoted"] and second["champion_version"] == "2", second["reasons"]
        run = registry.connect(get_settings()).get_run(second["run_id"])
        assert run.data.tags["trigger"] == "drift"
        assert "suite_feedback_accuracy" in run.data.metrics  # the gate scored feedback-test, for v2 and v1

        # the running service swaps to v2, which reads the corrected kind of digit better
        deadline = time.monotonic() + 300
        while http.get("/model").json().get("model_version") != "2" and time.monotonic() < deadline:
            time.sleep(0.5)
        after = _photos(http, thick)
    assert {a["model_version"] for a in after} == {"2"}
    v2_right = sum(a["digit"] == label for a, label in zip(after, thick.labels, strict=True))
    assert v2_right > v1_right, f"v1 read {v1_right} of {PHOTOS} thick digits, v2 {v2_right}"
