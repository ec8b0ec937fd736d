"""The BentoML service over real HTTP: a real ``bentoml serve`` process, a real MLflow registry.

Two servers start when the module starts (in parallel with training): one on a store that gets a
champion, one on a store that has none (503 until a first promotion). Models are small CNNs trained
on a slice of real MNIST.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx
import numpy as np
import pytest

from pipeline.settings import Settings
from tests.integration.serving_fixtures import (
    REPO,
    Server,
    log_model,
    png_claiming,
    register_and_promote,
    render,
    trained_model,
    using_store,
)

pytestmark = pytest.mark.integration

NO_CHAMPION = "no model has been promoted yet; run `digits retrain`"


@dataclass
class Champion:
    server: Server
    version: str
    run_id: str
    model: object
    accuracy: float

    def expected(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities computed in this process with the same model and the same code path."""
        from pipeline.preprocess import to_model_input
        from pipeline.train import compiled_predictor

        return compiled_predictor(self.model)(to_model_input(pixels))


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Both servers boot while the test process trains (each takes a few seconds to import TensorFlow)."""
    main = Server(tmp_path_factory.mktemp("served") / "project")
    empty = Server(tmp_path_factory.mktemp("empty") / "project", via_cli=True)  # `digits serve`
    for server in (main, empty):
        server.home.mkdir(parents=True)
        server.start()
    yield main, empty
    for server in (main, empty):
        server.stop()


@pytest.fixture(scope="module")
def champion(servers, mnist_slice) -> Champion:
    main, _ = servers
    model, accuracy = trained_model(mnist_slice, seed=42)
    with using_store(main.home):
        run_id, uri = log_model(model, mnist_slice, accuracy)
        version = register_and_promote(run_id, uri, "first champion")
    main.wait("/readyz", timeout=240)
    return Champion(main, version, run_id, model, accuracy)


@pytest.fixture(scope="module")
def http(champion):
    with httpx.Client(base_url=champion.server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def confident_digits(champion, mnist_slice) -> tuple[np.ndarray, np.ndarray]:
    """Test digits the model reads with confidence on the raw pixels: 2 of each class where possible."""
    probabilities = champion.expected(mnist_slice.x_test)
    right = (probabilities.argmax(1) == mnist_slice.y_test) & (probabilities.max(1) > 0.9)
    chosen = [i for digit in range(10) for i in np.flatnonzero(right & (mnist_slice.y_test == digit))[:2]]
    return mnist_slice.x_test[chosen], mnist_slice.y_test[chosen]


def _assert_answer(answer: dict, champion: Champion) -> None:
    fields = {"request_id", "digit", "confidence", "unsure", "probabilities", "model_name", "model_version", "run_id"}
    assert set(answer) == fields
    assert len(answer["request_id"]) == 32
    # the champion's run has no calibration of its own: the service's default threshold applies
    assert answer["unsure"] is (answer["confidence"] < Settings.model_fields["unsure_threshold"].default)
    assert len(answer["probabilities"]) == 10 and abs(sum(answer["probabilities"]) - 1) < 1e-3
    assert answer["digit"] == int(np.argmax(answer["probabilities"]))
    assert answer["confidence"] == max(answer["probabilities"])
    assert answer["model_name"] == "digits-cnn"
    assert (answer["model_version"], answer["run_id"]) == (champion.version, champion.run_id)


def _pixels(http: httpx.Client, pixels) -> httpx.Response:
    return http.post("/predict_pixels", json={"pixels": np.asarray(pixels).tolist()})


# ---------------------------------------------------------------- no champion yet


def test_without_a_champion_the_service_answers_503_until_the_first_promotion(servers, mnist_slice):
    _, empty = servers
    empty.wait("/livez", timeout=240)
    with httpx.Client(base_url=empty.url, timeout=60) as http:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the first look at the registry happens in the background
            info = http.get("/model")
            if NO_CHAMPION in info.json()["error"]:
                break
            time.sleep(0.5)
        assert info.status_code == 503 and NO_CHAMPION in info.json()["error"], info.text
        assert http.get("/readyz").status_code == 503
        assert http.get("/livez").status_code == 200

        png = render(mnist_slice.x_test[0])
        for response in (
            http.post("/predict", files={"image": ("d.png", png, "image/png")}),
            _pixels(http, mnist_slice.x_test[0]),
        ):
            assert response.status_code == 503, response.text
            assert NO_CHAMPION in response.json()["error"]
            assert response.headers["Retry-After"] == "1"

        import bentoml

        # readiness means "a model is loaded": skip the client's wait for it
        with bentoml.SyncHTTPClient(empty.url, server_ready_timeout=0) as client:
            with pytest.raises(bentoml.exceptions.BentoMLException) as raised:
                client.predict_pixels(pixels=mnist_slice.x_test[:2])
        assert raised.value.error_code == 503 and NO_CHAMPION in str(raised.value)

        # the first promotion: the running service picks it up without a restart
        model, accuracy = trained_model(mnist_slice, seed=42)
        with using_store(empty.home):
            run_id, uri = log_model(model, mnist_slice, accuracy)
            version = register_and_promote(run_id, uri, "first champion")
        promoted = time.monotonic()
        empty.wait("/readyz", timeout=30)
        answer = _pixels(http, mnist_slice.x_test[0])
        assert answer.status_code == 200, answer.text
        assert answer.json()[0]["model_version"] == version and answer.json()[0]["run_id"] == run_id
        assert time.monotonic() - promoted < 30


# ---------------------------------------------------------------- health and model info


def test_health_and_model_info(champion, http):
    assert http.get("/livez").status_code == 200
    assert http.get("/readyz").status_code == 200
    info = http.get("/model")
    assert info.status_code == 200, info.text
    info = info.json()
    assert info["model_name"] == "digits-cnn" and info["model_version"] == champion.version
    assert info["run_id"] == champion.run_id and info["uri"] == f"models:/digits-cnn/{champion.version}"
    assert info["metrics"]["test_accuracy"] == pytest.approx(champion.accuracy)
    assert info["data_version"] == "test-data"
    assert info["promoted_at"] and info["promotion_reason"] == "first champion" and info["promoted_by"]
    assert info["champion_poll_seconds"] == 1 and info["problem"] is None
    assert info["runtime"] == "tflite"  # the run logged a checked TensorFlow Lite export


# ---------------------------------------------------------------- images


def test_photos_and_drawings_of_real_digits(champion, http, confident_digits):
    """Real MNIST test digits as a person would send them: large, dark ink on light paper, PNG or JPEG."""
    from PIL import Image

    from pipeline.preprocess import image_bytes_to_mnist

    images, labels = confident_digits
    right = total = 0
    for pixels, label in zip(images, labels, strict=True):
        transparent = Image.new("RGBA", (200, 200), (0, 0, 0, 0))  # dark ink on a transparent canvas
        ink = Image.fromarray(pixels).resize((200, 200), Image.Resampling.BICUBIC)
        transparent.putalpha(ink)
        buffer = io.BytesIO()
        transparent.save(buffer, format="PNG")
        uploads = {
            "photo.png": (render(pixels, "PNG", 300), "image/png"),
            "photo.jpg": (render(pixels, "JPEG", 300), "image/jpeg"),
            "light-on-dark.png": (render(pixels, "PNG", 120, dark_on_light=False), "image/png"),
            "drawing.png": (buffer.getvalue(), "image/png"),
        }
        for name, (data, media_type) in uploads.items():
            response = http.post("/predict", files={"image": (name, data, media_type)})
            assert response.status_code == 200, response.text
            answer = response.json()
            _assert_answer(answer, champion)
            # the service normalises exactly like the library: same digit, same probabilities
            expected = champion.expected(image_bytes_to_mnist(data)[None])[0]
            assert answer["digit"] == int(expected.argmax())
            np.testing.assert_allclose(answer["probabilities"], expected, atol=2e-4)
            right += answer["digit"] == label
            total += 1
    assert right >= 0.9 * total, f"only {right} of {total} real digits read right through the photo path"


def test_explain_answers_as_predict_does_and_shows_where_the_ink_counted(champion, http, confident_digits):
    from PIL import Image

    from pipeline.preprocess import image_bytes_to_mnist

    images, _ = confident_digits
    photo = render(images[0], "PNG", 300)
    response = http.post("/explain", files={"image": ("photo.png", photo, "image/png")}, timeout=120)
    assert response.status_code == 200, response.text
    explained = response.json()
    predicted = http.post("/predict", files={"image": ("photo.png", photo, "image/png")}).json()
    assert {k: explained[k] for k in ("digit", "probabilities", "model_version", "run_id")} == {
        k: predicted[k] for k in ("digit", "probabilities", "model_version", "run_id")
    }
    assert "request_id" not in explained  # explaining is not answering: nothing is logged
    assert explained["method"].startswith("integrated gradients")
    saliency = np.asarray(explained["saliency"])
    seen = image_bytes_to_mnist(photo)
    assert saliency.shape == (28, 28) and saliency.max() == pytest.approx(1.0)
    assert saliency[seen == 0].sum() == 0 and saliency[seen > 0].sum() > 0  # only ink counts
    for name in ("seen_png", "overlay_png"):
        picture = Image.open(io.BytesIO(base64.b64decode(explained[name])))
        assert picture.format == "PNG" and picture.size == (224, 224)
    # bad input gets the same precise answers as /predict
    assert http.post("/explain", files={"image": ("x.png", b"not an image", "image/png")}).status_code == 400
    blank = render(np.zeros((28, 28), np.uint8), "PNG", 100)
    assert http.post("/explain", files={"image": ("blank.png", blank, "image/png")}).status_code == 422


# ---------------------------------------------------------------- the prediction log and corrections


def _log_rows(champion: Champion, request_ids: list[str]) -> dict[str, dict]:
    """The logged answers with these request ids, read from the service's own database."""
    import sqlalchemy as sa

    from pipeline import prediction_log

    engine = prediction_log.connect(Settings(home=champion.server.home).prediction_log_url)
    table = prediction_log.predictions
    with engine.connect() as connection:
        rows = connection.execute(sa.select(table).where(table.c.request_id.in_(request_ids))).all()
    engine.dispose()
    return {row.request_id: row._asdict() for row in rows}


def test_every_answer_is_logged_with_its_input_and_can_be_corrected_once(champion, http, mnist_slice):
    from pipeline.preprocess import image_bytes_to_mnist

    pixels = mnist_slice.x_test[:3]
    batch = _pixels(http, pixels).json()
    photo_bytes = render(mnist_slice.x_test[3], "PNG", 200)
    photo = http.post("/predict", files={"image": ("digit.png", photo_bytes, "image/png")}).json()
    drawing = http.post(
        "/predict", files={"image": ("pad.png", photo_bytes, "image/png")}, headers={"X-Digits-Source": "draw"}
    ).json()
    answers = [*batch, photo, drawing]
    ids = [a["request_id"] for a in answers]
    assert len(set(ids)) == 5, "every answer, each image of a batch included, has its own request id"

    # a correction is recorded once; the writer's queue is flushed first, so it may follow its answer at once
    wrong = (batch[0]["digit"] + 1) % 10
    first = http.post("/feedback", json={"request_id": ids[0], "label": wrong})
    assert first.status_code == 201, first.text
    # a label against a confident answer is held for review (the service's default policy)
    held = not batch[0]["unsure"] and batch[0]["confidence"] >= Settings().feedback_quarantine_confidence
    recorded = first.json()
    reason = f"contradicts an answer given with {batch[0]['confidence']:.1%} confidence"
    assert recorded.pop("reason", None) == (reason if held else None)
    assert recorded == {
        "request_id": ids[0],
        "label": wrong,
        "digit": batch[0]["digit"],
        "correct": False,
        "model_version": champion.version,
        "status": "quarantined" if held else "accepted",
    }
    again = http.post("/feedback", json={"request_id": ids[0], "label": batch[0]["digit"]})
    assert again.status_code == 409 and f"already corrected to {wrong}" in again.json()["error"]
    confirmed = http.post("/feedback", json={"request_id": ids[3], "label": str(photo["digit"])})
    assert confirmed.status_code == 201 and confirmed.json()["correct"] is True
    refused = {
        "unknown request": ({"request_id": "0" * 32, "label": 3}, 404, "no answer has request_id"),
        "label 10": ({"request_id": ids[1], "label": 10}, 422, "label must be a digit 0-9; got 10"),
        "label a word": ({"request_id": ids[1], "label": "seven"}, 422, "label must be a digit 0-9; got 'seven'"),
        "no label": ({"request_id": ids[1]}, 422, '"label" (the true digit 0-9)'),
    }
    for case, (body, status, message) in refused.items():
        response = http.post("/feedback", json=body)
        assert response.status_code == status and message in response.json()["error"], (case, response.text)
    broken = http.post("/feedback", content=b"{not json", headers={"Content-Type": "application/json"})
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]

    rows = _log_rows(champion, ids)
    assert [rows[i]["route"] for i in ids] == ["pixels", "pixels", "pixels", "photo", "draw"]
    for answer in answers:
        row = rows[answer["request_id"]]
        assert (row["digit"], row["model_version"], row["run_id"], row["unsure"]) == (
            answer["digit"],
            champion.version,
            champion.run_id,
            answer["unsure"],
        )
        assert row["confidence"] == pytest.approx(answer["confidence"]) and row["probabilities"] == answer["probabilities"]
        assert row["runtime"] == "tflite" and row["upload"] is None  # uploads are not kept by default
    # the normalised image is what the model saw
    from pipeline.prediction_log import image_of

    np.testing.assert_array_equal(image_of(rows[ids[0]]["image"]), pixels[0])
    np.testing.assert_array_equal(image_of(rows[ids[3]]["image"]), np.rint(image_bytes_to_mnist(photo_bytes)).astype(np.uint8))

    # /metrics counts answers and corrections per model version
    metrics = http.get("/metrics").text
    assert f'digits_answers_total{{model_version="{champion.version}"}}' in metrics
    assert f'digits_feedback_total{{model_version="{champion.version}"}}' in metrics
    info = http.get("/model").json()["prediction_log"]
    assert info["problem"] is None and info["written"] >= 5 and info["dropped"] == 0

    # `digits feedback --json` reads the same log; `digits log prune --days 0` keeps the corrected answers
    env = {**os.environ, "DIGITS_HOME": str(champion.server.home), "TF_CPP_MIN_LOG_LEVEL": "3"}

    def digits(*args: str) -> subprocess.CompletedProcess:
        command = [os.path.join(os.path.dirname(sys.executable), "digits"), *args]
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)

    report = digits("feedback", "--json")
    assert report.returncode == 0, report.stderr
    summary = json.loads(report.stdout)
    assert summary["feedback"] == 2 and summary["ready_to_harvest"] == 2 - held and summary["quarantined"] == held
    assert summary["by_version"][champion.version] == {"feedback": 2, "correct": 1, "accuracy": 0.5}
    assert summary["by_label"][str(wrong)] >= 1
    pruned = digits("log", "prune", "--days", "0")
    assert pruned.returncode == 0 and "deleted" in pruned.stdout, pruned.stderr
    assert set(_log_rows(champion, ids)) == {ids[0], ids[3]}


# ---------------------------------------------------------------- raw pixels


def test_raw_pixels_one_image_and_batches(champion, http, mnist_slice):
    x = mnist_slice.x_test
    expected = champion.expected(x)

    single = _pixels(http, x[0])
    assert single.status_code == 200, single.text
    [answer] = single.json()
    _assert_answer(answer, champion)
    np.testing.assert_allclose(answer["probabilities"], expected[0], atol=2e-4)

    as_floats = _pixels(http, x[0] * 0.99 + 0.25)  # floats on the 0-255 scale are fine
    assert as_floats.status_code == 200 and as_floats.json()[0]["digit"] == answer["digit"]

    batch = _pixels(http, x[:64])
    assert batch.status_code == 200, batch.text
    answers = batch.json()
    assert [a["digit"] for a in answers] == expected[:64].argmax(1).tolist()
    np.testing.assert_allclose([a["probabilities"] for a in answers], expected[:64], atol=2e-4)

    largest = np.resize(x, (1000, 28, 28))  # the largest batch a request may carry
    response = _pixels(http, largest)
    assert response.status_code == 200 and len(response.json()) == 1000


def test_concurrent_requests_are_batched_without_mixing_answers(champion, http, mnist_slice):
    """32 clients at once: adaptive batching merges their images, and each still gets its own answer."""
    x = mnist_slice.x_test[:256]
    expected = champion.expected(x).argmax(1)
    results: dict[int, int] = {}
    failures: list[str] = []

    def client(worker: int) -> None:
        with httpx.Client(base_url=champion.server.url, timeout=60) as own:
            for i in range(worker, len(x), 32):
                response = _pixels(own, x[i])
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text[:200]}")
                else:
                    results[i] = response.json()[0]["digit"]

    threads = [threading.Thread(target=client, args=(w,)) for w in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert [results[i] for i in range(len(x))] == expected.tolist()


def test_bentoml_python_client(champion, mnist_slice, tmp_path):
    import bentoml

    image = tmp_path / "seven.png"
    image.write_bytes(render(mnist_slice.x_test[0]))
    expected = champion.expected(mnist_slice.x_test[:5]).argmax(1).tolist()
    with bentoml.SyncHTTPClient(champion.server.url) as client:
        assert client.is_ready()
        answer = client.predict(image=image)
        _assert_answer(answer, champion)
        answers = client.predict_pixels(pixels=mnist_slice.x_test[:5])
        assert [a["digit"] for a in answers] == expected
        with pytest.raises(bentoml.exceptions.BentoMLException) as raised:
            client.predict_pixels(pixels=mnist_slice.x_test[:2] * 2.0)
    assert raised.value.error_code == 400 and "above 255" in str(raised.value)


# ---------------------------------------------------------------- bad input


def _seven(mnist_slice) -> bytes:
    return render(mnist_slice.x_test[0])


def _jpeg(mnist_slice) -> bytes:
    return render(mnist_slice.x_test[0], "JPEG")


def _noise_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


ZEROS = np.zeros((28, 28), dtype=int).tolist()
BAD_INPUTS = {
    # name: (route, request keyword arguments (a callable of the slice), status, fragment of the message)
    "empty body": ("/predict", lambda s: {}, 400, "image is required"),
    "wrong form field": (
        "/predict",
        lambda s: {"files": {"file": ("d.png", _seven(s), "image/png")}},
        400,
        "unexpected form field(s) with binary data: file; POST /predict takes a multipart form with the file in field `image`",
    ),
    "empty file": ("/predict", lambda s: {"files": {"image": ("d.png", b"", "image/png")}}, 400, "the image is empty (0 bytes)"),
    "not an image": (
        "/predict",
        lambda s: {"files": {"image": ("d.png", b"%PDF-1.4 not an image", "image/png")}},
        400,
        "PDF files are not accepted: send a PNG, JPEG, WebP, BMP, GIF or TIFF image",
    ),
    "truncated PNG": (
        "/predict",
        lambda s: {"files": {"image": ("d.png", _seven(s)[:-200], "image/png")}},
        400,
        "the image is corrupt or truncated",
    ),
    "truncated JPEG": (
        "/predict",
        lambda s: {"files": {"image": ("d.jpg", _jpeg(s)[: len(_jpeg(s)) // 2], "image/jpeg")}},
        400,
        "the image is corrupt or truncated",
    ),
    "decompression bomb": (
        "/predict",
        lambda s: {"files": {"image": ("b.png", png_claiming(8000, 8000), "image/png")}},
        400,
        "the PNG would decode to 8000x8000 pixels; the limit is 16,777,216",
    ),
    "0 pixels on a side": (
        "/predict",
        lambda s: {"files": {"image": ("z.png", png_claiming(0, 28), "image/png")}},
        400,
        "the image is 0x28 pixels; it needs at least 1x1",
    ),
    "100,000 pixels on a side": (
        "/predict",
        lambda s: {"files": {"image": ("w.png", png_claiming(100_000, 28), "image/png")}},
        400,
        "the image is 100000x28 pixels; the limit is 8192 on a side",
    ),
    "blank page": (
        "/predict",
        lambda s: {"files": {"image": ("blank.png", render(np.zeros((28, 28), np.uint8)), "image/png")}},
        422,
        "no digit found: the image is one flat tone",
    ),
    "noise": (
        "/predict",
        lambda s: {"files": {"image": ("noise.png", _noise_png(), "image/png")}},
        422,
        "not a digit",
    ),
    "file of 20 MiB": (  # with the form around it, over the limit: refused from its declared length
        "/predict",
        lambda s: {"files": {"image": ("big.png", os.urandom(20 * 2**20), "image/png")}},
        413,
        "/predict takes at most 20,971,520",
    ),
    "body of 100 MiB": (
        "/predict",
        lambda s: {"content": b"x" * (100 * 2**20), "headers": {"content-type": "multipart/form-data; boundary=x"}},
        413,
        "the request body is 104,857,600 bytes; /predict takes at most 20,971,520",
    ),
    "pixels body of 20 MiB": (
        "/predict_pixels",
        lambda s: {"content": b'{"pixels": [' + b"0," * (10 * 2**20) + b"0]}", "headers": {"content-type": "application/json"}},
        413,
        "/predict_pixels takes at most",
    ),
    "pixels missing": ("/predict_pixels", lambda s: {"json": {}}, 400, "pixels is required"),
    "pixels not JSON": (
        "/predict_pixels",
        lambda s: {"content": b"pixels=1", "headers": {"content-type": "application/json"}},
        400,
        "the body is not valid JSON",
    ),
    "pixels null": ("/predict_pixels", lambda s: {"json": {"pixels": None}}, 400, "pixels is null"),
    "pixels a string": (
        "/predict_pixels",
        lambda s: {"json": {"pixels": "seven"}},
        400,
        "pixels must be a 28x28 array or a batch (n, 28, 28) of numbers; got a str",
    ),
    "pixels of strings": (
        "/predict_pixels",
        lambda s: {"json": {"pixels": [["0"] * 28] * 28}},
        400,
        "pixels must be numbers 0-255; got strings",
    ),
    "pixels of booleans": (
        "/predict_pixels",
        lambda s: {"json": {"pixels": [[True] * 28] * 28}},
        400,
        "pixels must be numbers 0-255, not booleans",
    ),
    "pixels with nulls": (
        "/predict_pixels",
        lambda s: {"json": {"pixels": [[None] * 28] * 28}},
        400,
        "pixels must hold only numbers 0-255",
    ),
    "ragged rows": (
        "/predict_pixels",
        lambda s: {"json": {"pixels": [[0] * 28] * 27 + [[0] * 27]}},
        400,
        "pixels is not a rectangular array",
    ),
    "wrong shape 28x27": (
        "/predict_pixels",
        lambda s: {"json": {"pixels": [[0] * 27] * 28}},
        400,
        "pixels has shape (28, 27); expected one image (28, 28) or a batch (n, 28, 28)",
    ),
    "wrong shape with channel": (
        "/predict_pixels",
        lambda s: {"json": {"pixels": [[[[0]] * 28] * 28]}},
        400,
        "pixels has shape (1, 28, 28, 1)",
    ),
    "flat 784 values": ("/predict_pixels", lambda s: {"json": {"pixels": [0] * 784}}, 400, "pixels has shape (784,)"),
    "empty array": ("/predict_pixels", lambda s: {"json": {"pixels": []}}, 400, "pixels is empty"),
    "NaN": (
        "/predict_pixels",
        lambda s: {
            "content": json.dumps({"pixels": [[float("nan")] * 28] * 28}).encode(),
            "headers": {"content-type": "application/json"},
        },
        400,
        "pixels holds 784 NaN or infinite value(s), the first at image 0, row 0, column 0",
    ),
    "negative values": (
        "/predict_pixels",
        lambda s: {"json": {"pixels": [[0] * 28] * 27 + [[0] * 27 + [-1]]}},
        400,
        "pixel values must lie within 0-255; 1 is below 0, the first -1 at image 0, row 27, column 27",
    ),
    "values above 255": ("/predict_pixels", lambda s: {"json": {"pixels": [[256] * 28] * 28}}, 400, "784 are above 255"),
    "values normalised to 0-1": (
        "/predict_pixels",
        lambda s: {"json": {"pixels": (s.x_test[0] / 255).tolist()}},
        400,
        "pixel values look normalised to 0-1",
    ),
    "oversized batch": (
        "/predict_pixels",
        lambda s: {"json": {"pixels": [ZEROS] * 1001}},
        400,
        "the batch holds 1,001 images; the limit is 1,000 per request",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_precise_4xx_and_the_service_keeps_serving(case, champion, http, mnist_slice):
    route, request, status, fragment = BAD_INPUTS[case]
    response = http.post(route, **request(mnist_slice))
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"], response.text
    after = _pixels(http, mnist_slice.x_test[0])
    assert after.status_code == 200 and after.json()[0]["model_version"] == champion.version


# ---------------------------------------------------------------- CLI and Bento


def test_cli_predict_prints_digit_and_confidence(champion, mnist_slice, tmp_path):
    import typer
    from typer.testing import CliRunner

    from cli.serving import predict

    app = typer.Typer()
    app.command()(predict)
    app.command("other")(lambda: None)  # two commands, as in `digits predict`
    good, bad, blank = tmp_path / "seven.png", tmp_path / "broken.png", tmp_path / "blank.png"
    good.write_bytes(render(mnist_slice.x_test[0]))
    bad.write_bytes(b"not an image")
    blank.write_bytes(render(np.zeros((28, 28), np.uint8)))
    expected = int(champion.expected(mnist_slice.x_test[:1]).argmax())
    with using_store(champion.server.home):
        result = CliRunner().invoke(app, ["predict", str(good), "--image", str(bad), "--image", str(blank)])
        as_json = CliRunner().invoke(app, ["predict", "--json", str(good)])
    assert result.exit_code == 1, result.output
    assert f"seven.png: {expected} (" in result.stdout and "%)" in result.stdout
    assert "broken.png: error: not a readable image" in result.stderr
    assert "blank.png: error: no digit found" in result.stderr
    assert f"answered by digits-cnn v{champion.version} (run {champion.run_id}, runtime tflite)" in result.stderr
    assert as_json.exit_code == 0 and json.loads(as_json.stdout)["digit"] == expected


def test_bentoml_build_makes_a_bento(tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    built = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "-f", "serving/bentofile.yaml", "-o", "tag", "."],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    tag = built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    bento = tmp_path / "bentoml" / "bentos" / name / version
    for file in (
        "serving/service.py",
        "serving/champion.py",
        "serving/static/index.html",
        "serving/static/draw.js",
        "pipeline/preprocess.py",
        "pipeline/registry.py",
        "pipeline/prediction_log.py",
        "pipeline/migrations/env.py",
        "pipeline/migrations/script.py.mako",
        "pipeline/migrations/versions/0001_prediction_log.py",
    ):
        assert (bento / "src" / file).is_file(), file
    manifest = (bento / "bento.yaml").read_text()
    assert "service: serving.service:DigitClassifier" in manifest
    assert "route: /predict\n" in manifest and "route: /predict_pixels" in manifest
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    for package in ("tensorflow-cpu==", "opencv-python-headless==", "sqlalchemy==", "alembic=="):
        assert package in requirements, package


# ---------------------------------------------------------------- a challenger in the shadows


def _shadow_rows(champion: Champion, request_ids: list[str], timeout: float = 60) -> dict[str, dict]:
    """The challenger's logged answers to these requests, once the writer has written them all."""
    import sqlalchemy as sa

    from pipeline import prediction_log

    engine = prediction_log.connect(Settings(home=champion.server.home).prediction_log_url)
    table = prediction_log.shadow_answers
    deadline = time.monotonic() + timeout
    try:
        while True:
            with engine.connect() as connection:
                rows = connection.execute(sa.select(table).where(table.c.request_id.in_(request_ids))).all()
            if len(rows) >= len(request_ids) or time.monotonic() > deadline:
                return {row.request_id: row._asdict() for row in rows}
            time.sleep(0.2)
    finally:
        engine.dispose()


def _wait_for_challenger(http: httpx.Client, version: str | None, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = http.get("/model").json()
        found = (info.get("challenger") or {}).get("model_version")
        if found == version or time.monotonic() > deadline:
            assert found == version, info.get("challenger")
            return info
        time.sleep(0.3)


def test_a_challenger_answers_in_the_shadows_and_never_to_the_client(champion, http, mnist_slice):
    from app import promotion
    from pipeline import registry
    from pipeline.preprocess import to_model_input
    from pipeline.settings import get_settings
    from pipeline.train import compiled_predictor

    challenger_model, accuracy = trained_model(mnist_slice, seed=7)
    with using_store(champion.server.home):
        run_id, uri = log_model(challenger_model, mnist_slice, accuracy)
        client = registry.connect(get_settings())
        version = registry.register(client, get_settings().model_name, uri, run_id, {"data_version": "test-data"}).version
        with pytest.raises(registry.PromotionError, match="is the champion"):
            promotion.shadow(get_settings(), champion.version)
        assert promotion.shadow(get_settings(), version).version == version
    info = _wait_for_challenger(http, version)
    assert info["model_version"] == champion.version  # the champion still answers

    pixels = mnist_slice.x_test[:40]
    answers = _pixels(http, pixels).json()
    assert {a["model_version"] for a in answers} == {champion.version}
    np.testing.assert_allclose([a["probabilities"] for a in answers], champion.expected(pixels), atol=2e-4)
    ids = [a["request_id"] for a in answers]
    shadows = _shadow_rows(champion, ids)
    assert set(shadows) == set(ids), "every image the champion answered, the challenger answered too"
    theirs = compiled_predictor(challenger_model)(to_model_input(pixels)).argmax(axis=1)
    assert [shadows[i]["digit"] for i in ids] == theirs.tolist()
    assert {row["model_version"] for row in shadows.values()} == {version}
    label = int(mnist_slice.y_test[0])
    assert http.post("/feedback", json={"request_id": ids[0], "label": label}).status_code == 201

    # `digits status` compares them on live traffic: agreement, and both on the corrections
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # MLflow exports the last store it used
    env |= {"DIGITS_HOME": str(champion.server.home), "TF_CPP_MIN_LOG_LEVEL": "3"}
    status = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "digits"), "status", "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    live = json.loads(status.stdout)["challenger"]["live"]
    served = [a["digit"] for a in answers]
    assert live["requests"] >= 40 and live["versions_it_shadowed"] == [champion.version]
    assert live["agreement"] == pytest.approx(np.mean(np.asarray(served) == theirs), abs=0.05)
    assert live["feedback"] >= 1

    # the shadow run ends: new answers get no shadow
    with using_store(champion.server.home):
        assert promotion.shadow(get_settings(), None) is None
    _wait_for_challenger(http, None)
    later = [a["request_id"] for a in _pixels(http, pixels[:3]).json()]
    assert _shadow_rows(champion, later, timeout=3) == {}


# ---------------------------------------------------------------- hot swap (last: it moves the champion)


def _wait_until(condition, timeout: float, what: str, poll: float = 0.1) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(poll)


def test_promotion_during_traffic_swaps_without_failed_requests(champion, mnist_slice):
    """Move the champion while clients send requests: no request fails, answers switch to the new version."""
    server = champion.server
    new_model, accuracy = trained_model(mnist_slice, seed=7)
    with using_store(server.home):
        # logged before traffic, like a retrain; without an export, like a version from before exports
        run_id, uri = log_model(new_model, mnist_slice, accuracy, tflite=False)

    stop = threading.Event()
    failures: list[str] = []
    seen: list[list[tuple[float, str]]] = [[] for _ in range(6)]
    png = render(mnist_slice.x_test[1])

    def client(worker: int) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as own:
            while not stop.is_set():
                try:
                    if worker % 2:
                        response = own.post("/predict", files={"image": ("d.png", png, "image/png")})
                        version = response.json()["model_version"] if response.status_code == 200 else None
                    else:
                        response = _pixels(own, mnist_slice.x_test[worker : worker + 3])
                        version = response.json()[0]["model_version"] if response.status_code == 200 else None
                    if response.status_code != 200:
                        failures.append(f"{response.status_code}: {response.text[:300]}")
                    else:
                        seen[worker].append((time.monotonic(), version))
                except httpx.HTTPError as err:
                    failures.append(repr(err))

    threads = [threading.Thread(target=client, args=(w,)) for w in range(len(seen))]
    for t in threads:
        t.start()
    try:
        # traffic first: every client has had answers from the old version before the alias moves
        _wait_until(lambda: all(len(w) >= 3 for w in seen) or failures, 120, "every client answered three times")
        with using_store(server.home):
            new_version = register_and_promote(run_id, uri, "better model")
        moved = time.monotonic()
        # and after the swap: every client has had answers from the new version, so none was caught in between
        _wait_until(
            lambda: all(sum(v == new_version for _, v in w) >= 3 for w in seen) or failures, 120, "every client saw the swap"
        )
    finally:
        stop.set()
        for t in threads:
            t.join()

    assert not failures, failures[:5]
    answered = sorted(a for w in seen for a in w)
    assert len(answered) > 50
    switched = min(t for t, v in answered if v == new_version)
    swap_seconds = switched - moved
    print(
        f"\nswap: first answer from v{new_version} {swap_seconds:.1f} s after the alias moved; {len(answered)} requests, 0 failed"
    )
    assert swap_seconds < 30  # the bound: poll (1 s here, 10 s by default) + load and warm-up
    assert any(v == champion.version and t > moved for t, v in answered), "no request was served during the load"
    for worker in seen:  # once a client saw the new version, it never sees the old one again
        versions = [v for _, v in worker]
        if new_version in versions:
            assert set(versions[versions.index(new_version) :]) == {new_version}
    info = httpx.get(server.url + "/model").json()
    assert info["model_version"] == new_version and info["run_id"] == run_id
    assert info["runtime"] == "keras"  # no export in its run: the Keras model answers
