"""What every request to the service passes before BentoML or the pages see it, and every answer after.

* Security headers on every answer: a Content-Security-Policy that allows only the service's own
  scripts, styles and connections (and no framing), X-Frame-Options, X-Content-Type-Options, Referrer-Policy.
* An optional API key (``DIGITS_API_KEY``): requests that change something (POST and other non-GET
  methods) need it in ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``, else 401. Pages and GET
  routes stay open.
* A body limit per route, counted on the bytes as they arrive, whether the request declares its
  Content-Length or is chunked: past it, 413 and the connection is closed, so the rest is never read.
* While no model is loaded, the prediction routes answer 503 saying why, before the request is parsed.
* Error answers (4xx and 5xx) carry no file paths or tracebacks: they are replaced by ``<path>``, and
  the detail stays in the server log. BentoML's validation errors have their reasons lifted into ``error``.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.responses import JSONResponse

from pipeline.preprocess import MAX_BYTES, SIDE

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# routes that need a model: refused with 503 before their body is read while none is loaded
PREDICTION_ROUTES = frozenset({"/predict", "/predict_pixels", "/explain"})
HOW_TO_SEND = {
    "image": "POST /predict takes a multipart form with the file in field `image` (curl -F image=@digit.png)",
    "pixels": 'POST /predict_pixels takes JSON {"pixels": [[...28 numbers 0-255...] x 28]} or a batch (n, 28, 28)',
}
# Bodies larger than any valid request are refused: an image upload is MAX_BYTES all told, the form's framing
# included, so an image over the limit is refused from its declared length, unread; the largest batch with
# each number written in up to 16 characters; a correction is a few dozen bytes of JSON.
FORM_FRAMING = 64 * 1024
PIXEL_CHARACTERS = 16
FEEDBACK_BYTES = 4096
# any other route (BentoML's own included) takes no more than a small form
OTHER_BODY_BYTES = 64 * 1024
# methods that read and never change anything: open without the API key
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# The drawing page loads its script and stylesheet from /static and talks only to this service; BentoML's
# API page loads Swagger UI from /static_content (its inline analytics snippet is blocked, as intended).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)
HOW_TO_AUTHENTICATE = "send the service's API key as `Authorization: Bearer KEY` or `X-API-Key: KEY`"

# an absolute path (two parts at least), a file or sqlite URI, a Windows path: what an exception's text may hold
_PATHS = re.compile(
    r"\b(?:file|sqlite(?:\+\w+)?):/+[^\s'\"`,;()\[\]]*"
    r"|(?<![\w.:/~-])~?(?:/[\w.@+~%=-]+){2,}/?"
    r"|\b[A-Za-z]:\\[^\s'\"`,;()\[\]]*"
)
CLIENT_TEXT_CHARS = 500


def body_limit(path: str, max_batch_images: int) -> int:
    """The largest request body ``path`` takes, in bytes."""
    if path in ("/predict", "/explain"):  # an image in a form
        return MAX_BYTES
    if path == "/predict_pixels":
        return max_batch_images * SIDE * SIDE * PIXEL_CHARACTERS + FORM_FRAMING
    if path == "/feedback":
        return FEEDBACK_BYTES
    return OTHER_BODY_BYTES


def declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The request's Content-Length, or None (chunked, or not a number: the HTTP server refuses those)."""
    for key, value in headers:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def too_large(path: str, limit: int, length: int | None = None) -> str:
    """The 413's message: the declared length, or (chunked) that the body went past the limit."""
    size = f"is {length:,} bytes" if length is not None else f"is over {limit:,} bytes (sent in chunks)"
    return f"the request body {size}; {path} takes at most {limit:,}"


def api_key_refusal(headers: list[tuple[bytes, bytes]], api_key: str | None) -> str | None:
    """Why a request that needs the API key is refused (None: no key is set, or it sent the right one).

    Compared in constant time, so that the time of a refusal tells nothing about the key.
    """
    if not api_key:
        return None
    sent: bytes | None = None
    for key, value in headers:
        if key == b"x-api-key":
            sent = value.strip()
        elif key == b"authorization" and value[:7].lower() == b"bearer ":
            sent = value[7:].strip()
    if sent is None:
        return f"this service needs an API key: {HOW_TO_AUTHENTICATE}"
    if not hmac.compare_digest(sent, api_key.encode()):
        return f"the API key is not right: {HOW_TO_AUTHENTICATE}"
    return None


def for_clients(text: str) -> str:
    """Text fit to send to a client: no paths, no traceback, one bounded line (the server log has the detail)."""
    text = text.split("Traceback (most recent call last)", 1)[0]
    text = " ".join(_PATHS.sub("<path>", text).split())
    return text if len(text) <= CLIENT_TEXT_CHARS else text[: CLIENT_TEXT_CHARS - 1] + "…"


def redacted(value: Any) -> Any:
    """``value`` (parsed JSON) with every string passed through ``for_clients``."""
    if isinstance(value, str):
        return for_clients(value)
    if isinstance(value, list):
        return [redacted(item) for item in value]
    if isinstance(value, dict):
        return {key: redacted(item) for key, item in value.items()}
    return value


def with_security_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    present = {key.lower() for key, _ in headers}
    return [*headers, *((key, value) for key, value in SECURITY_HEADERS if key not in present)]


def clarify_validation_error(body: bytes) -> bytes:
    """``{"error": "1 validation error for Input", "detail": [{loc, msg}]}`` -> the reasons in ``error``."""
    try:
        payload = json.loads(body)
        details = payload["detail"]
        if not str(payload.get("error", "")).endswith("for Input") or not isinstance(details, list):
            return body
        reasons = []
        for item in details:
            where = ".".join(str(part) for part in item.get("loc", ()))
            what, kind = item.get("msg", "invalid"), item.get("type")
            if kind == "missing":
                reasons.append(f"{where} is required: " + HOW_TO_SEND.get(where, "see /docs.json"))
            elif kind == "json_invalid":
                reasons.append(f"the body is not valid JSON ({what}): " + "; ".join(HOW_TO_SEND.values()))
            else:
                reasons.append(what if not where or what.startswith(where) else f"{where}: {what}")
        payload["error"] = "; ".join(reasons)
        return json.dumps(payload).encode()
    except (ValueError, KeyError, TypeError, AttributeError):
        return body


def _redacted_body(body: bytes) -> bytes:
    try:
        return json.dumps(redacted(json.loads(body))).encode()
    except ValueError:  # not JSON: plain text from a server layer
        return for_clients(body.decode(errors="replace")).encode()


def error_response(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


class BodyTooLarge(Exception):
    """Raised into the application when a body passes its limit: it stops reading, the guard answers 413."""


class ServingGuard:
    """ASGI middleware around the whole service (see the module's docstring)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from pipeline.settings import get_settings

        settings = get_settings()
        path, headers = scope.get("path", ""), scope.get("headers", [])

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": with_security_headers(list(message.get("headers", [])))}
            await send(message)

        if scope.get("method", "GET") not in SAFE_METHODS:
            key = settings.api_key.get_secret_value() if settings.api_key else None
            if refusal := api_key_refusal(headers, key):
                await error_response(401, refusal, **{"WWW-Authenticate": "Bearer"})(scope, receive, send_with_headers)
                return
        limit = body_limit(path, settings.max_batch_images)
        length = declared_length(headers)
        if length is not None and length > limit:
            # closing the connection is what keeps the server from reading (and discarding) the rest
            await error_response(413, too_large(path, limit, length), Connection="close")(scope, receive, send_with_headers)
            return
        if path in PREDICTION_ROUTES and (unavailable := _model_unavailable()):
            await unavailable(scope, receive, send_with_headers)
            return
        await _Exchange(self.app, scope, receive, send_with_headers, limit).run()


def _model_unavailable() -> JSONResponse | None:
    """503 saying why while no model is loaded (BentoML itself would answer a generic 5xx text)."""
    import bentoml

    from serving.champion import ModelUnavailable

    watcher = getattr(bentoml.get_current_service(), "watcher", None)
    if watcher is None:
        return None
    try:
        watcher.require()
    except ModelUnavailable as err:
        return error_response(503, for_clients(str(err)), **{"Retry-After": str(max(1, round(watcher.poll_seconds)))})
    return None


class _Exchange:
    """One request passed on to the application: its body counted, its error answers cleaned."""

    def __init__(self, app, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        self.app, self.scope, self._receive, self._send, self.limit = app, scope, receive, send, limit
        self.received = 0
        self.exceeded = False
        self.started = False  # a response has begun to go to the client
        self.answered_instead = False  # the guard answered (413 or 500): the application's answer is dropped
        self.held: Message | None = None  # the start of an error answer, sent once its body is cleaned
        self.chunks: list[bytes] = []

    async def run(self) -> None:
        try:
            await self.app(self.scope, self.receive, self.send)
        except Exception:
            if self.exceeded:
                log.info("refused the rest of a body over %s bytes on %s", f"{self.limit:,}", self.scope.get("path"))
            else:
                log.exception("%s %s failed", self.scope.get("method"), self.scope.get("path"))
            if not self.started:
                await self._answer_instead()
            return
        if self.exceeded and not self.started:
            await self._answer_instead()

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                self.exceeded = True
                await self._answer_instead()
                raise BodyTooLarge(f"over {self.limit} bytes")
        return message

    async def _answer_instead(self) -> None:
        """413 for a body over its limit (and the connection closed), else a 500 that says nothing of the cause."""
        if self.started:
            return
        self.started = self.answered_instead = True
        if self.exceeded:
            response = error_response(413, too_large(self.scope.get("path", ""), self.limit), Connection="close")
        else:
            response = error_response(500, "the service failed to answer this request; the server log has the details")
        await response(self.scope, self._receive, self._send)

    async def send(self, message: Message) -> None:
        if self.answered_instead:
            return
        if message["type"] == "http.response.start":
            if message["status"] < 400:
                self.started = True
                await self._send(message)
            else:
                self.held = message
            return
        if self.held is None or message["type"] != "http.response.body":
            await self._send(message)
            return
        self.chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        body = b"".join(self.chunks)
        if self.held["status"] == 400 and self.scope.get("path") in PREDICTION_ROUTES:
            body = clarify_validation_error(body)
        body = _redacted_body(body)
        headers = [(k, v) for k, v in self.held["headers"] if k.lower() != b"content-length"]
        self.started = True
        held, self.held = self.held, None
        await self._send({**held, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await self._send({"type": "http.response.body", "body": body})
