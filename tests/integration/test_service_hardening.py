"""The service cannot be tipped over: hostile requests against a real `bentoml serve` over HTTP.

One server has a champion (a small CNN trained on real MNIST); the other has no MLflow store at all
and an API key set, so its answers name a server path unless they are cleaned, and its POST routes
need the key.
"""

from __future__ import annotations

import io
import select
import socket
import time

import httpx
import pytest
from PIL import Image

from tests.integration.serving_fixtures import Server, log_model, register_and_promote, render, trained_model, using_store

pytestmark = pytest.mark.integration

API_KEY = "test-key-8c1f"
HEADERS = {
    "content-security-policy": "script-src 'self'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    main = Server(tmp_path_factory.mktemp("hardened") / "project")
    keyed = Server(tmp_path_factory.mktemp("keyed") / "project", extra_env={"DIGITS_API_KEY": API_KEY})
    for server in (main, keyed):
        server.home.mkdir(parents=True)
        server.start()
    yield main, keyed
    for server in (main, keyed):
        server.stop()


@pytest.fixture(scope="module")
def main(servers, mnist_slice) -> Server:
    server, _ = servers
    model, accuracy = trained_model(mnist_slice, seed=42)
    with using_store(server.home):
        run_id, uri = log_model(model, mnist_slice, accuracy)
        register_and_promote(run_id, uri, "first champion")
    server.wait("/readyz", timeout=240)
    return server


@pytest.fixture(scope="module")
def keyed(servers) -> Server:
    _, server = servers
    server.wait("/livez", timeout=240)
    return server


def _upload(data: bytes, name: str = "x.png") -> dict:
    return {"files": {"image": (name, data, "application/octet-stream")}}


# ---------------------------------------------------------------- the body limit


# a well-formed start of each route's body, then filler that keeps it well-formed: a parser reads on
UPLOADS = {
    "/predict": (
        "multipart/form-data; boundary=b",
        b'--b\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\nContent-Type: image/png\r\n\r\n',
        b"\0",
    ),
    "/predict_pixels": ("application/json", b'{"pixels": [', b"0,"),
}


def _chunked_upload(port: int, path: str, total: int, chunk: int = 256 * 1024) -> tuple[int, bytes]:
    """POST ``total`` bytes in chunked encoding, as fast as the server takes them, until it answers.

    Returns the bytes of body sent before the answer (or before the server stopped taking them) and the answer.
    """
    content_type, start, filler = UPLOADS[path]
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(10)  # a server that stops reading blocks the sender: then the answer is read
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\nContent-Type: {content_type}\r\n\r\n".encode()
    )
    sock.sendall(f"{len(start):x}\r\n".encode() + start + b"\r\n")
    piece = f"{chunk:x}\r\n".encode() + filler * (chunk // len(filler)) + b"\r\n"
    sent, answer = len(start), b""
    try:
        while sent < total:
            if select.select([sock], [], [], 0)[0]:
                break  # the server answered: stop sending, as a client would
            sock.sendall(piece)
            sent += chunk
    except OSError:  # the server closed the connection (reset, broken pipe) or stopped reading (timeout)
        pass
    try:
        while chunk_read := sock.recv(65536):
            answer += chunk_read
            if b"\r\n\r\n" in answer and b"}" in answer:
                break
    except OSError:
        pass
    sock.close()
    return sent, answer


@pytest.mark.parametrize("path", list(UPLOADS))
def test_a_chunked_200_mb_upload_is_answered_413_without_being_read(main, path):
    total = 200 * 2**20
    sent, answer = _chunked_upload(main.port, path, total)
    # at most the limit (about 21 MB for /predict, 12.6 MB for /predict_pixels) plus what the sockets' buffers hold
    status = answer.split(b"\r\n", 1)[0].decode(errors="replace")
    assert sent < 40 * 2**20, f"{sent / 2**20:.0f} MiB of {total / 2**20:.0f} MiB were sent before the answer ({status})"
    assert status == "HTTP/1.1 413 Request Entity Too Large" and b"takes at most" in answer, answer[:300]
    assert httpx.get(main.url + "/readyz", timeout=30).status_code == 200


def test_a_declared_oversized_body_is_answered_413_and_the_connection_closed(main):
    sock = socket.create_connection(("127.0.0.1", main.port))
    sock.settimeout(30)
    sock.sendall(b"POST /feedback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n{")
    answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413") and b"connection: close" in answer.lower(), answer
    sock.close()


# ---------------------------------------------------------------- what is decoded


def test_a_decompression_bomb_is_refused_before_it_is_decoded(main):
    buffer = io.BytesIO()
    Image.new("1", (6300, 6300), 1).save(buffer, format="PNG")  # a few KB on the wire, 40 MP decoded
    with httpx.Client(base_url=main.url, timeout=60) as http:
        answers = [http.post("/predict", **_upload(buffer.getvalue(), "bomb.png")) for _ in range(4)]
        assert all(a.status_code == 400 for a in answers), answers[0].text
        assert "would decode to 6300x6300 pixels; the limit is 16,777,216" in answers[0].json()["error"]


def test_postscript_never_reaches_a_decoder(main):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buffer, format="EPS")
    answer = httpx.post(main.url + "/predict", **_upload(buffer.getvalue(), "digit.eps"), timeout=60)
    assert answer.status_code == 400
    assert "PostScript (EPS) files are not accepted: send a PNG, JPEG, WebP, BMP, GIF or TIFF image" in answer.json()["error"]


def test_a_phone_sized_photo_is_read(main, mnist_slice):
    photo = render(mnist_slice.x_test[0], fmt="JPEG", size=3456)
    image = Image.open(io.BytesIO(photo)).resize((4608, 3456))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # 16 MP in a format decoded in full, then reduced
    answer = httpx.post(main.url + "/predict", **_upload(buffer.getvalue()), timeout=60)
    assert answer.status_code == 200, answer.text


# ---------------------------------------------------------------- headers and what errors tell


def test_every_page_and_answer_carries_the_security_headers(main):
    with httpx.Client(base_url=main.url, timeout=60) as http:
        answers = {
            "drawing page": http.get("/draw"),
            "its script": http.get("/static/draw.js"),
            "API page": http.get("/"),
            "champion": http.get("/model"),
            "liveness": http.get("/livez"),
            "a prediction": http.post("/predict_pixels", json={"pixels": [[0] * 28] * 28}),
            "a 400": http.post("/predict_pixels", json={"pixels": "seven"}),
            "a 404": http.get("/nowhere"),
        }
    for what, answer in answers.items():
        for header, fragment in HEADERS.items():
            found = answer.headers.get(header, "")
            assert fragment in found, f"{what} ({answer.status_code}): {header} = {found!r}"


def test_answers_name_no_server_path(main, keyed):
    model = httpx.get(main.url + "/model", timeout=30)
    assert model.status_code == 200 and str(main.home) not in model.text, model.text
    # no store at all: the reason names the missing database, and must not say where it was looked for
    for answer in (httpx.get(keyed.url + "/model", timeout=30), httpx.get(keyed.url + "/readyz", timeout=30)):
        assert answer.status_code == 503
        assert str(keyed.home) not in answer.text and "/tmp" not in answer.text, answer.text
    refused = httpx.post(keyed.url + "/predict_pixels", json={"pixels": [[0] * 28] * 28}, headers={"X-API-Key": API_KEY})
    assert refused.status_code == 503 and "no model has been promoted yet" in refused.json()["error"]
    assert str(keyed.home) not in refused.text, refused.text


# ---------------------------------------------------------------- the API key


def test_with_an_api_key_set_post_routes_need_it_and_pages_stay_open(keyed):
    pixels = {"pixels": [[0] * 28] * 28}
    with httpx.Client(base_url=keyed.url, timeout=60) as http:
        for path, body in (("/predict_pixels", pixels), ("/feedback", {"request_id": "x", "label": 1})):
            missing = http.post(path, json=body)
            assert missing.status_code == 401, missing.text
            assert "needs an API key" in missing.json()["error"] and missing.headers["www-authenticate"] == "Bearer"
            assert http.post(path, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert http.post(path, json=body, headers={"X-API-Key": API_KEY + "x"}).status_code == 401
        # the right key passes the guard (then: no model yet, 503; an unknown request id, 404)
        assert http.post("/predict_pixels", json=pixels, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 503
        assert http.post("/feedback", json={"request_id": "x", "label": 1}, headers={"X-API-Key": API_KEY}).status_code == 404
        assert http.post("/predict", files={"image": ("d.png", b"x")}).status_code == 401
        for page in ("/draw", "/static/draw.js", "/livez", "/"):
            assert http.get(page).status_code == 200, page


def test_the_service_still_answers_quickly_after_all_this(main, mnist_slice):
    start = time.monotonic()
    answer = httpx.post(main.url + "/predict_pixels", json={"pixels": mnist_slice.x_test[0].tolist()}, timeout=60)
    assert answer.status_code == 200 and time.monotonic() - start < 10
