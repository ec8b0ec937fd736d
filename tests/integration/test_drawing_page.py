"""The drawing page in real headless Chromium: draw strokes with the mouse and a finger, read the answer."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

from pipeline.settings import Settings
from tests.integration.serving_fixtures import Server, log_model, register_and_promote, trained_model, using_store

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory, mnist_slice):
    server = Server(tmp_path_factory.mktemp("drawing") / "project")
    server.home.mkdir(parents=True)
    server.start()  # boots while the model is logged
    try:
        model, accuracy = trained_model(mnist_slice, seed=42)
        with using_store(server.home):
            run_id, uri = log_model(model, mnist_slice, accuracy)
            register_and_promote(run_id, uri, "champion for the drawing page")
        server.wait("/readyz", timeout=240)
        yield server
    finally:
        server.stop()


def _answer(browser) -> dict:
    """What the page shows: the digit, and each bar's probability and drawn width."""
    from selenium.webdriver.common.by import By

    bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
    return {
        "digit": browser.find_element(By.ID, "digit").text,
        "state": browser.find_element(By.ID, "digit").get_attribute("data-state"),
        "confidence": browser.find_element(By.ID, "confidence").text,
        "status": browser.find_element(By.ID, "status").text,
        "bars": [
            (
                int(b.get_attribute("data-digit")),
                float(b.get_attribute("data-probability") or "nan"),
                b.find_element(By.CLASS_NAME, "fill").size["width"],
                "top" in b.get_attribute("class"),
            )
            for b in bars
        ],
    }


def _wait_for_answer(browser) -> dict:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(
        lambda b: (
            b.find_element(By.ID, "digit").get_attribute("data-state") in ("answered", "unsure")
            and not b.find_element(By.ID, "predict").get_attribute("disabled")
        )
    )
    WebDriverWait(browser, 5).until(  # the bars grow in a short transition
        lambda b: b.find_element(By.CSS_SELECTOR, "#bars .bar.top .fill").size["width"] > 20
    )
    return _answer(browser)


def _pad_png(browser) -> bytes:
    data_url = browser.execute_script("return document.getElementById('pad').toDataURL('image/png')")
    return base64.b64decode(data_url.split(",", 1)[1])


def _check_shown_answer(shown: dict, server: Server, png: bytes) -> None:
    assert shown["digit"] in list("0123456789"), shown
    digits, probabilities, widths, top = zip(*shown["bars"], strict=True)
    assert digits == tuple(range(10))
    assert abs(sum(probabilities) - 1) < 1e-3
    assert top.index(True) == int(shown["digit"]) == int(np.argmax(probabilities))
    assert widths[int(shown["digit"])] > 0  # the winning bar is drawn (in pixels, on screen)
    assert "answered by digits-cnn v1" in shown["status"]
    # the page shows what the API answers for exactly this drawing
    api = httpx.post(server.url + "/predict", files={"image": ("pad.png", png, "image/png")}, timeout=60).json()
    assert api["digit"] == int(shown["digit"])
    np.testing.assert_allclose(api["probabilities"], probabilities, atol=1e-6)
    # an unsure answer shows "not sure" and the two most probable digits; a sure one its confidence
    assert shown["state"] == ("unsure" if api["unsure"] else "answered")
    if api["unsure"]:
        first, second = np.argsort(probabilities)[::-1][:2]
        assert shown["confidence"].startswith(f"not sure: {first} (") and f" or {second} (" in shown["confidence"]
    else:
        assert shown["confidence"].endswith("% sure"), shown["confidence"]


def _logged(server: Server, status_text: str) -> dict:
    """The prediction log's row for the answer on show (found by its feedback), with its correction."""
    import sqlalchemy as sa

    from pipeline import prediction_log

    engine = prediction_log.connect(f"sqlite:///{server.home / 'logs' / 'predictions.db'}")
    table = prediction_log.predictions.join(prediction_log.feedback)
    query = sa.select(prediction_log.predictions.c.route, prediction_log.predictions.c.digit, prediction_log.feedback.c.label)
    with engine.connect() as connection:
        rows = connection.execute(query.select_from(table).order_by(prediction_log.feedback.c.id.desc())).all()
    engine.dispose()
    assert rows, f"no correction in the log; the page said {status_text!r}"
    return rows[0]._asdict()


def _send_feedback(browser, button_id: str | None = None, label: int | None = None) -> str:
    """Press "Right" or "Wrong, it was <label>" and wait for the page to say it was recorded."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    assert browser.find_element(By.ID, "feedback").is_displayed()
    selector = f"#{button_id}" if button_id else f'#labels button[data-label="{label}"]'
    browser.find_element(By.CSS_SELECTOR, selector).click()
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "feedback-status").text)
    status = browser.find_element(By.ID, "feedback-status").text
    # one correction per answer: the buttons are off once it is sent
    assert browser.find_element(By.ID, "right").get_attribute("disabled")
    return status


def _check_what_the_model_saw(browser, server: Server, png: bytes) -> None:
    """Below the answer: the normalised digit the model saw, and on request the saliency over it (from POST /explain)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def loaded_picture(b) -> str | None:
        seen = b.find_element(By.ID, "seen")
        ready = b.find_element(By.ID, "why").is_displayed() and b.execute_script("return arguments[0].naturalWidth", seen) == 224
        return seen.get_attribute("src") if ready else None

    seen_src = WebDriverWait(browser, 120).until(loaded_picture)  # the first /explain loads the Keras model
    explained = httpx.post(server.url + "/explain", files={"image": ("pad.png", png, "image/png")}, timeout=120).json()
    assert seen_src == f"data:image/png;base64,{explained['seen_png']}"
    browser.find_element(By.ID, "show-why").click()
    overlay_src = WebDriverWait(browser, 10).until(lambda b: loaded_picture(b) if loaded_picture(b) != seen_src else None)
    assert overlay_src == f"data:image/png;base64,{explained['overlay_png']}"
    assert "where the model looked" in browser.find_element(By.ID, "seen").get_attribute("alt")


def test_draw_a_digit_with_the_mouse_and_see_the_prediction(server, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/draw")
    WebDriverWait(browser, 30).until(lambda b: "digits-cnn v1" in b.find_element(By.ID, "model").text)
    pad = browser.find_element(By.ID, "pad")

    # pressing Predict on an empty pad asks for a drawing
    browser.find_element(By.ID, "predict").click()
    assert "Draw a digit first" in browser.find_element(By.ID, "status").text

    # a 7: the top bar, then the long diagonal stroke (offsets are from the pad's centre)
    strokes = ActionChains(browser, duration=10)
    strokes.move_to_element_with_offset(pad, -70, -90).click_and_hold()
    for _ in range(7):
        strokes.move_by_offset(20, 0)
    for _ in range(9):
        strokes.move_by_offset(-8, 20)
    strokes.release().perform()  # auto-predict fires when the stroke ends
    shown = _wait_for_answer(browser)
    _check_shown_answer(shown, server, _pad_png(browser))

    # Clear empties the pad and the answer; a vertical stroke and the Predict button read a 1
    browser.find_element(By.ID, "clear").click()
    assert browser.find_element(By.ID, "digit").text == "?"
    browser.find_element(By.ID, "auto").click()  # predict on the button only
    one = ActionChains(browser, duration=10)
    one.move_to_element_with_offset(pad, 0, -95).click_and_hold()
    for _ in range(10):
        one.move_by_offset(0, 19)
    one.release().perform()
    assert browser.find_element(By.ID, "digit").get_attribute("data-state") == "empty"
    browser.find_element(By.ID, "predict").click()
    shown = _wait_for_answer(browser)
    _check_shown_answer(shown, server, _pad_png(browser))
    assert shown["digit"] == "1"
    _check_what_the_model_saw(browser, server, _pad_png(browser))

    # "Right" confirms the answer: the log holds the drawing's answer with its label
    status = _send_feedback(browser, button_id="right")
    assert status == "Thank you: recorded that 1 was right.", status
    assert _logged(server, status) == {"route": "draw", "digit": 1, "label": 1}


def test_draw_with_a_finger(server, browser):
    """Touch input (pointer events of kind touch) draws too, without scrolling the page."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions import interaction
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/draw")
    WebDriverWait(browser, 30).until(lambda b: "digits-cnn v1" in b.find_element(By.ID, "model").text)
    pad = browser.find_element(By.ID, "pad")
    finger = ActionChains(browser)
    finger.w3c_actions = ActionBuilder(browser, mouse=PointerInput(interaction.POINTER_TOUCH, "finger"), duration=10)
    finger.w3c_actions.pointer_action.move_to(pad, 0, -95).pointer_down()
    for step in range(1, 11):
        finger.w3c_actions.pointer_action.move_to(pad, 0, -95 + 19 * step)
    finger.w3c_actions.pointer_action.pointer_up()
    finger.perform()
    shown = _wait_for_answer(browser)
    _check_shown_answer(shown, server, _pad_png(browser))

    # "Wrong, it was 7" corrects it; the button of the digit it answered is not offered
    answered = int(shown["digit"])
    assert browser.find_element(By.CSS_SELECTOR, f'#labels button[data-label="{answered}"]').get_attribute("disabled")
    status = _send_feedback(browser, label=7 if answered != 7 else 4)
    label = 7 if answered != 7 else 4
    assert status.startswith(f"Thank you: recorded that it was {label}, not {answered}."), status
    # a label against a confident answer waits for a person's review, and the page says so
    confidence = max(probability for _, probability, _, _ in shown["bars"])
    held = shown["state"] == "answered" and confidence >= Settings().feedback_quarantine_confidence
    assert status.endswith("A person will review it before it counts.") == held, status
    assert _logged(server, status) == {"route": "draw", "digit": answered, "label": label}


def test_the_api_page_renders_under_the_content_security_policy(server, browser):
    """BentoML's Swagger page at / loads its scripts from the service itself: the policy leaves it working."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock-summary-path"))
    paths = {e.text.strip() for e in browser.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock-summary-path")}
    assert {"/predict", "/predict_pixels"} <= paths, paths


API_KEY = "drawing-page-key"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, mnist_slice):
    """The same champion behind a service started with DIGITS_API_KEY."""
    server = Server(tmp_path_factory.mktemp("keyed-drawing") / "project", extra_env={"DIGITS_API_KEY": API_KEY})
    server.home.mkdir(parents=True)
    server.start()
    try:
        model, accuracy = trained_model(mnist_slice, seed=42)
        with using_store(server.home):
            run_id, uri = log_model(model, mnist_slice, accuracy)
            register_and_promote(run_id, uri, "champion behind a key")
        server.wait("/readyz", timeout=240)
        yield server
    finally:
        server.stop()


def test_with_an_api_key_the_page_asks_for_it_once_and_then_works(keyed_server, browser):
    """Under the service's Content-Security-Policy and API key: a 401 makes the page ask, then it answers."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(keyed_server.url + "/draw")
    WebDriverWait(browser, 30).until(lambda b: "digits-cnn v1" in b.find_element(By.ID, "model").text)  # GET: open
    pad = browser.find_element(By.ID, "pad")
    stroke = ActionChains(browser, duration=10)
    stroke.move_to_element_with_offset(pad, 0, -95).click_and_hold()
    for _ in range(10):
        stroke.move_by_offset(0, 19)
    stroke.release().perform()
    prompt = WebDriverWait(browser, 30).until(seen.alert_is_present())
    assert "API key" in prompt.text
    prompt.send_keys(API_KEY)
    prompt.accept()
    shown = _wait_for_answer(browser)
    assert shown["digit"] in list("0123456789") and "answered by digits-cnn v1" in shown["status"]
    # the key is kept for the tab: the correction goes through without asking again
    status = _send_feedback(browser, button_id="right")
    assert status.startswith("Thank you: recorded that"), status
