"""The pure parts of the service's guard: body limits, the API key check, what errors may tell clients, headers."""

from __future__ import annotations

import json

import pytest

from serving.guard import (
    CLIENT_TEXT_CHARS,
    FEEDBACK_BYTES,
    OTHER_BODY_BYTES,
    SECURITY_HEADERS,
    api_key_refusal,
    body_limit,
    declared_length,
    for_clients,
    redacted,
    with_security_headers,
)


def test_each_route_has_a_body_limit_and_any_other_a_small_one():
    assert body_limit("/predict", 1000) == 20 * 2**20  # the form around the image included
    assert body_limit("/predict_pixels", 10) < body_limit("/predict_pixels", 1000)
    assert body_limit("/feedback", 1000) == FEEDBACK_BYTES
    assert body_limit("/anything/else", 1000) == OTHER_BODY_BYTES


def test_declared_length_is_read_and_a_chunked_request_has_none():
    assert declared_length([(b"content-type", b"x"), (b"content-length", b"123")]) == 123
    assert declared_length([(b"transfer-encoding", b"chunked")]) is None
    assert declared_length([(b"content-length", b"12x")]) is None


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], "needs an API key"),
        ([(b"authorization", b"Bearer wrong")], "not right"),
        ([(b"x-api-key", b"wrong")], "not right"),
        ([(b"authorization", b"Basic c2VjcmV0")], "needs an API key"),  # not a bearer token: no key sent
        ([(b"authorization", b"Bearer s3cret")], None),
        ([(b"authorization", b"bearer  s3cret ")], None),
        ([(b"x-api-key", b"s3cret")], None),
    ],
)
def test_the_api_key_is_taken_from_either_header(headers, expected):
    refusal = api_key_refusal(headers, "s3cret")
    assert (refusal is None) if expected is None else (expected in refusal and "X-API-Key" in refusal)


def test_without_a_key_set_nothing_is_refused():
    assert api_key_refusal([], None) is None and api_key_refusal([], "") is None


@pytest.mark.parametrize(
    ("text", "kept", "gone"),
    [
        (
            "champion v3 could not be loaded (OSError: [Errno 2] No such file: '/srv/digits/mlruns/1/abc/model.keras')",
            "champion v3 could not be loaded (OSError: [Errno 2] No such file: '<path>')",
            "/srv/digits",
        ),
        ("there is no MLflow store at /home/ann/proj/mlflow/mlflow.db: run from", "store at <path>: run from", "/home/ann"),
        ("the log at sqlite:////var/lib/digits/predictions.db cannot be opened", "the log at <path> cannot", "/var/lib"),
        ("artifact file:///data/mlruns/7/artifacts is gone", "artifact <path> is gone", "/data/mlruns"),
        (r"C:\Users\ann\model.keras is locked", "<path> is locked", "Users"),
        ("boom\nTraceback (most recent call last):\n  File x", "boom", "Traceback"),
    ],
)
def test_errors_for_clients_carry_no_paths_or_tracebacks(text, kept, gone):
    cleaned = for_clients(text)
    assert kept in cleaned and gone not in cleaned, cleaned


@pytest.mark.parametrize(
    "text",
    [
        "no model has been promoted yet; run `digits retrain` to train one and promote it",
        "models:/digits-cnn@champion v2 (runs:/abc/model) is served",
        "POST /predict takes a multipart form with the file in field `image` (curl -F image=@digit.png)",
        "the image is 100000x28 pixels; the limit is 8192 on a side",
        "pixels has shape (28, 27); expected one image (28, 28) or a batch (n, 28, 28)",
    ],
)
def test_ordinary_messages_are_left_as_they_are(text):
    assert for_clients(text) == text


def test_long_text_is_cut_and_json_is_cleaned_throughout():
    assert len(for_clients("x" * 10_000)) == CLIENT_TEXT_CHARS
    body = {"error": "at /a/b/c", "problem": None, "detail": [{"msg": "see /etc/x/y"}], "n": 3}
    expected = {"error": "at <path>", "problem": None, "detail": [{"msg": "see <path>"}], "n": 3}
    assert json.loads(json.dumps(redacted(body))) == expected


def test_security_headers_are_added_once():
    headers = with_security_headers([(b"content-type", b"text/html"), (b"x-frame-options", b"SAMEORIGIN")])
    names = [key for key, _ in headers]
    assert all(names.count(key) == 1 for key, _ in SECURITY_HEADERS)
    assert (b"x-frame-options", b"SAMEORIGIN") in headers  # an answer's own choice stands
    policy = dict(headers)[b"content-security-policy"]
    assert b"script-src 'self'" in policy and b"frame-ancestors 'none'" in policy
