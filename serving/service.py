"""The BentoML service: whatever ``models:/<name>@champion`` points to, for people and programs.

Serve it with ``digits serve`` (or ``bentoml serve serving.service:DigitClassifier``).

====================  ====================================================================
POST /predict         multipart field ``image``: a PNG/JPEG photo, scan or drawing of one digit
POST /predict_pixels  JSON ``{"pixels": ...}``: one 28x28 array or a batch (n, 28, 28), 0-255
POST /feedback        JSON ``{"request_id": "...", "label": 7}``: the true digit of an answer (201)
GET  /model           the champion being served: version, run, metrics, data version, promoted-at
GET  /model/card      the champion's model card (HTML): data, metrics, gate decision, known limits
GET  /livez           liveness (the process answers)
GET  /readyz          readiness (200 once a model is loaded, 503 before)
GET  /draw            a drawing pad: draw a digit, see the prediction and its probabilities
GET  /                BentoML's API page (OpenAPI at /docs.json)
====================  ====================================================================

Every prediction carries a ``request_id``, ``digit``, ``confidence``, ``unsure`` (below the version's
calibrated threshold), the ten ``probabilities`` and the ``model_name``, ``model_version`` and ``run_id``
that answered. Each answer is recorded in the prediction log (:mod:`pipeline.prediction_log`) by a
writer thread off the request path, and ``POST /feedback`` records its true digit once.

Bad input is answered with a 4xx and a precise message (never a 500): 422 for a readable
image that shows no digit; while no model has been promoted, prediction routes answer 503 saying so
and how to train one. Every request passes :class:`serving.guard.ServingGuard` first: body limits
counted as bytes arrive (413), the optional API key on POST routes (``DIGITS_API_KEY``, 401), security
headers on every answer, and no server path or traceback in any error.

A version under the ``challenger`` alias (``digits promote VERSION --shadow``) runs in the shadows:
after the champion's answer is sent, the challenger answers the same images in a batcher of its own
and its answers go to the log beside the champion's, never to the client.

The champion is followed by :class:`serving.champion.ChampionWatcher`: a background thread polls
the alias every ``DIGITS_CHAMPION_POLL_SECONDS`` (default 10) and swaps in a new version only after
it has loaded and answered a warm-up, so no request fails during a swap. Requests that arrive
while the model is busy share its next call (:class:`serving.batching.MicroBatcher`). What answers
is the champion's int8 TensorFlow Lite export (:mod:`pipeline.export`) when its run kept one, else
its float32 export, else the Keras model; ``/model`` says which (``runtime``).
``DIGITS_SERVE_RUNTIME=tflite`` starts at the float32 export, ``keras`` forces Keras.
"""

import asyncio
import base64
import gc
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import anyio
import bentoml
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, RedirectResponse
from pydantic import BaseModel, BeforeValidator, Field, TypeAdapter
from pydantic_core import PydanticCustomError
from sqlalchemy.exc import SQLAlchemyError
from starlette.responses import JSONResponse, Response
from starlette.staticfiles import StaticFiles

from pipeline import prediction_log
from pipeline.explain import METHOD, Explainer, digit_png, overlay_png
from pipeline.preprocess import ImageError, NotADigitError, image_bytes_to_mnist
from pipeline.registry import CHALLENGER, ModelRef
from pipeline.settings import Settings, get_settings
from serving.batching import MicroBatcher
from serving.champion import ChampionWatcher, ModelUnavailable
from serving.guard import FEEDBACK_BYTES, HOW_TO_SEND, ServingGuard, redacted
from serving.inputs import InputRefused, parse_pixels

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
# Images merged into one model call (a single larger request still runs alone, in one call).
BATCH_IMAGES = 1000
# Uploads decoded at once (Pillow and NumPy release the GIL for much of it); more just contend.
DECODE_THREADS = 2
GC_THRESHOLDS = (10_000, 20, 100)
# the drawing page names itself so that its answers are logged as drawings, not photos
SOURCE_HEADER = "x-digits-source"
# images waiting for the challenger; beyond it the shadow skips requests (and counts them) rather than fall behind
SHADOW_BACKLOG = 2000
# the served version's model card (app/cards.py), linked from /model and the drawing page
MODEL_CARD_ROUTE = "/model/card"
CARD_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


# ---------------------------------------------------------------- inputs and answers


def _pixels_validator(raw: Any) -> np.ndarray:
    try:
        return parse_pixels(raw, get_settings().max_batch_images)
    except InputRefused as err:
        # a pydantic error: BentoML answers it with 400 before the endpoint runs
        raise PydanticCustomError("invalid_pixels", str(err)) from None


Pixels = Annotated[
    np.ndarray,
    BeforeValidator(_pixels_validator),
    Field(description="one 28x28 array, or a batch (n, 28, 28), of numbers 0-255 (0 = background, 255 = ink)"),
]


class Prediction(BaseModel):
    """The answer for one image, and which model gave it."""

    request_id: str = Field(description="this answer's id: send it with the true digit to POST /feedback")
    digit: int = Field(description="the predicted digit 0-9")
    confidence: float = Field(description="the probability of that digit")
    unsure: bool = Field(description="the confidence is below the version's unsure threshold: check before acting on it")
    probabilities: list[float] = Field(description="the probability of each digit 0-9")
    model_name: str
    model_version: str
    run_id: str | None


PREDICTIONS = TypeAdapter(list[Prediction])


class Explained(BaseModel):
    """The served answer for one image, and why: where its ink counted for the answered digit."""

    digit: int
    confidence: float
    unsure: bool
    probabilities: list[float]
    model_name: str
    model_version: str
    run_id: str | None
    method: str = Field(description="how the saliency was computed")
    saliency: list[list[float]] = Field(description="28x28, 0-1: how much each pixel of the normalised digit counted")
    seen_png: str = Field(description="base64 PNG: the normalised 28x28 digit the model saw, enlarged")
    overlay_png: str = Field(description="base64 PNG: the saliency as a heat map over that digit")


def _json(body: bytes) -> Response:
    """A ready JSON answer, which BentoML passes through as it is.

    For a returned model BentoML 1.4 builds the output's JSON schema again on every response, to
    find its media type; a ready response skips that work.
    """
    return Response(body, media_type="application/json")


def tolerate_unexpected_form_files() -> None:
    """Work around BentoML 1.4: a file sent under an unexpected form field name answers 500.

    BentoML json-decodes every multipart field that is not a declared file field; a binary one
    (``-F file=@digit.png`` instead of ``-F image=@...``) raises UnicodeDecodeError, a 500. Here that
    becomes a validation error naming the unexpected field (so a 400 with a precise message).
    """
    try:
        from _bentoml_impl import serde
        from pydantic import ValidationError
    except ImportError:  # a BentoML without this module: nothing to work around
        return
    base = serde.ALL_SERDE.get("multipart/form-data")
    if base is None or getattr(base, "tolerates_unexpected_files", False):
        return

    class TolerantMultipartSerde(base):
        tolerates_unexpected_files = True

        async def parse_request(self, request, cls):
            try:
                return await super().parse_request(request, cls)
            except UnicodeDecodeError:
                form = await request.form()  # parsed once already: Starlette keeps it
                unexpected = sorted(k for k in form if k not in cls.model_fields)
                message = f"unexpected form field(s) with binary data: {', '.join(unexpected) or '?'}; " + HOW_TO_SEND.get(
                    next(iter(cls.model_fields), ""), "see /docs.json"
                )
                raise ValidationError.from_exception_data(
                    "Input", [{"type": PydanticCustomError("unexpected_field", message), "loc": (), "input": None}]
                ) from None

    for media_type, serde_class in list(serde.ALL_SERDE.items()):
        if serde_class is base:
            serde.ALL_SERDE[media_type] = TolerantMultipartSerde  # type: ignore[index]


def _read_upload(path: Path, keep_bytes: int = 0) -> tuple[np.ndarray, bytes | None]:
    """The uploaded file -> the 28x28 digit (in a worker thread), and the file itself when it is at most
    ``keep_bytes`` long (for the log). ServingGuard has refused any body over MAX_BYTES, the form included."""
    data = path.read_bytes()
    return image_bytes_to_mnist(data), (data if len(data) <= keep_bytes else None)


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


# ---------------------------------------------------------------- the prediction log


@dataclass
class AnswerLog:
    """The service's side of the prediction log: the writer, the database, and the counters on /metrics.

    A database that cannot be opened leaves the log off (``problem`` says why); answering goes on.
    """

    writer: prediction_log.LogWriter | None
    problem: str | None
    url: str
    keep_upload_bytes: int

    @classmethod
    def open(cls, settings: Settings) -> "AnswerLog":
        url = settings.prediction_log_url
        if not settings.log_enabled:
            return cls(None, "the prediction log is off (DIGITS_LOG_ENABLED=false)", url, 0)
        try:
            engine = prediction_log.open_log(url)
        except prediction_log.PredictionLogError as err:  # the service answers without a log rather than not at all
            log.error("%s; answers are not recorded", err)
            return cls(None, str(err), url, 0)
        writer = prediction_log.LogWriter(engine, capacity=settings.log_queue_size).start()
        log.info("recording answers in %s", prediction_log.safe_url(url))
        return cls(writer, None, url, settings.log_upload_bytes)

    def record(self, request: prediction_log.Answered | prediction_log.ShadowAnswered) -> int:
        """Queue a request's answers (or the challenger's) for the log, never waiting; how many were dropped."""
        return self.writer.submit(request) if self.writer else 0

    def info(self) -> dict:
        stats = self.writer.stats() if self.writer else {}
        return {"database": prediction_log.safe_url(self.url), "problem": self.problem, **stats}

    def close(self) -> None:
        if self.writer:
            self.writer.close()


class Counters:
    """Prometheus counters (on BentoML's /metrics): answers, unsure answers and feedback per model version,
    and log entries dropped."""

    def __init__(self) -> None:
        self.answers = bentoml.metrics.Counter(
            name="digits_answers", documentation="answered images", labelnames=["model_version"]
        )
        self.unsure = bentoml.metrics.Counter(
            name="digits_unsure_answers", documentation="answers marked unsure", labelnames=["model_version"]
        )
        self.feedback = bentoml.metrics.Counter(
            name="digits_feedback", documentation="corrections, by the version that answered", labelnames=["model_version"]
        )
        self.dropped = bentoml.metrics.Counter(
            name="digits_log_dropped", documentation="answers not recorded because the log's queue was full"
        )

    def count(self, answers: list[dict], dropped: int) -> None:
        version = str(answers[0]["model_version"])  # one request is answered by one version
        self.answers.labels(model_version=version).inc(len(answers))
        if unsure := sum(a["unsure"] for a in answers):
            self.unsure.labels(model_version=version).inc(unsure)
        if dropped:
            self.dropped.inc(dropped)


# ---------------------------------------------------------------- the service

ui = FastAPI(title="digits pages", docs_url=None, redoc_url=None, openapi_url=None)
ui.mount("/static", StaticFiles(directory=STATIC), name="static")


@bentoml.service(
    name="digits",
    workers=1,
    traffic={"timeout": 30},
    logging={"access": {"enabled": True, "skip_paths": ["/livez", "/readyz", "/metrics", "/static"]}},
)
@bentoml.asgi_app(ui, path="/")
class DigitClassifier:
    """Handwritten-digit recognition with the MLflow champion, hot-swapped on promotion."""

    def __init__(self) -> None:
        logging.getLogger("serving").setLevel(logging.INFO)
        tolerate_unexpected_form_files()
        # Per-request garbage of the HTTP stack reaches the oldest generation under load, and with the
        # default thresholds full collections then stall every request: collect the young less often
        # (TensorFlow's objects are frozen out of collections, see champion.py).
        gc.set_threshold(*GC_THRESHOLDS)
        self.settings = get_settings()
        self.watcher = ChampionWatcher(self.settings, tf_threads=self.settings.serve_tf_threads).start()
        self.batcher = MicroBatcher(self._answer, max_images=BATCH_IMAGES)
        self.answer_log = AnswerLog.open(self.settings)
        self.counters = Counters()
        self.challenger = ChampionWatcher(self.settings, tf_threads=self.settings.serve_tf_threads, alias=CHALLENGER).start()
        self.shadow = MicroBatcher(self._shadow_answer, max_images=BATCH_IMAGES)
        self.shadow_waiting = 0
        self.shadow_skipped = 0
        self._shadow_tasks: set[asyncio.Task] = set()
        self._decoders: anyio.CapacityLimiter | None = None
        self._explaining: anyio.Lock | None = None
        self._explainer: tuple[str, Explainer] | None = None  # (version, its explainer)
        log.info("following models:/%s@champion every %.0f s", self.settings.model_name, self.watcher.poll_seconds)

    def __is_ready__(self) -> bool:
        """Readiness: a model is loaded (``/readyz`` answers 503 before that)."""
        return self.watcher.current is not None

    @bentoml.on_shutdown
    def stop(self) -> None:
        self.watcher.stop()
        self.challenger.stop()
        self.answer_log.close()  # writes what is still queued

    def _answer(self, images: np.ndarray) -> list[dict]:
        """One model call for a batch of images (in a worker thread): the champion of this moment answers."""
        model = self.watcher.require()
        return [{**answer, "runtime": model.runtime} for answer in model.answers(images)]

    async def _predict(self, images: np.ndarray, route: str, upload: bytes | None = None) -> list[dict] | JSONResponse:
        """The answers for ``images``, each with a new request id, queued for the log as they are sent."""
        try:
            answers = await self.batcher.submit(images)
        except ModelUnavailable as err:  # only before the first load, and ServingGuard answers those
            return _error(503, str(err))
        request_ids = [prediction_log.new_request_id() for _ in answers]
        for answer, request_id in zip(answers, request_ids, strict=True):
            answer["request_id"] = request_id
        dropped = 0
        if self.answer_log.writer:
            logged = prediction_log.answered(request_ids, route, answers, answers[0]["runtime"], images, upload)
            dropped = self.answer_log.record(logged)
        self.counters.count(answers, dropped)
        challenger = self.challenger.current
        if challenger is not None and challenger.ref.version != answers[0]["model_version"]:
            self._run_in_the_shadows(images, request_ids)
        return answers

    # ------------------------------------------------------------ the challenger, after the answer is sent

    def _shadow_answer(self, images: np.ndarray) -> list[dict | None]:
        model = self.challenger.current
        if model is None:  # its alias went away meanwhile
            return [None] * len(images)
        return [{**answer, "runtime": model.runtime} for answer in model.answers(images)]

    def _run_in_the_shadows(self, images: np.ndarray, request_ids: list[str]) -> None:
        """Let the challenger answer too, in a task of its own: the request does not wait for it."""
        if self.shadow_waiting + len(images) > SHADOW_BACKLOG:
            self.shadow_skipped += len(images)
            return
        self.shadow_waiting += len(images)
        task = asyncio.ensure_future(self._shadow_run(images, request_ids))
        self._shadow_tasks.add(task)  # a task nobody holds may be collected before it ends
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow_run(self, images: np.ndarray, request_ids: list[str]) -> None:
        try:
            answers = await self.shadow.submit(images)
            if answers[0] is not None:  # None: the challenger's alias went away meanwhile
                self.answer_log.record(prediction_log.shadow_answered(request_ids, answers, answers[0]["runtime"]))
        except Exception:  # the champion's answer is sent already; the shadow's failure is only logged
            log.exception("the challenger could not answer %d image(s)", len(images))
        finally:
            self.shadow_waiting -= len(images)

    @bentoml.api(route="/predict")
    async def predict(
        self,
        image: Annotated[Path, Field(description="a PNG or JPEG of one digit (photo, scan or drawing)")],
        ctx: bentoml.Context,
    ) -> Prediction:
        """Predict the digit in an uploaded image (multipart field ``image``), any size and polarity.

        The image gets the same MNIST-style normalisation as the training data: grayscale, polarity,
        the paper separated from the ink, crop to the digit, scale into a 20x20 box, centre by mass in
        28x28. Answers the digit, its confidence, the ten probabilities and the model name, version and
        run id. An unreadable file gets 400; a readable image that shows no digit (blank, noise, ink all
        over) gets 422 saying what was seen.
        """
        route = "draw" if ctx.request.headers.get(SOURCE_HEADER) == "draw" else "photo"
        response = await self._predict_upload(image, route)
        ctx.response.status_code = response.status_code  # with a context, BentoML answers with its status
        return response

    async def _predict_upload(self, image: Path, route: str) -> Response:
        read = await self._read_digit(image, self.answer_log.keep_upload_bytes)
        if isinstance(read, Response):
            return read
        digit, upload = read
        answers = await self._predict(digit[None], route, upload)
        return answers if isinstance(answers, JSONResponse) else _json(Prediction(**answers[0]).model_dump_json().encode())

    async def _read_digit(self, image: Path, keep_bytes: int) -> tuple[np.ndarray, bytes | None] | Response:
        """The upload as a normalised digit (and itself, to keep), or the error answer saying why not."""
        if self._decoders is None:
            self._decoders = anyio.CapacityLimiter(DECODE_THREADS)
        try:
            return await anyio.to_thread.run_sync(_read_upload, image, keep_bytes, limiter=self._decoders)
        except NotADigitError as err:  # readable, but no digit in it: a guess would be worse than saying so
            return _error(422, str(err))
        except ImageError as err:
            return _error(400, str(err))

    @bentoml.api(route="/predict_pixels")
    async def predict_pixels(self, pixels: Pixels) -> list[Prediction]:
        """Predict digits from raw pixels: one 28x28 array or a batch (n, 28, 28), 0 = background, 255 = ink.

        Answers a list with one prediction per image. Requests that arrive while the model is busy
        share its next call (adaptive batching); a request is never split between two models.
        """
        answers = await self._predict(pixels, "pixels")
        return answers if isinstance(answers, JSONResponse) else _json(PREDICTIONS.dump_json([Prediction(**a) for a in answers]))

    # ------------------------------------------------------------ why an answer (off the prediction path)

    @bentoml.api(route="/explain")
    async def explain(
        self,
        image: Annotated[Path, Field(description="a PNG or JPEG of one digit, as for /predict")],
        ctx: bentoml.Context,
    ) -> Explained:
        """Why the champion answers what it does for an image: the answer, as /predict gives it (not logged),
        and a saliency map over the normalised 28x28 digit (integrated gradients on the version's Keras
        model), as numbers and as PNGs of the digit the model saw and of the map over it.

        The first call for a version loads its Keras model (TensorFlow), which takes seconds; /predict
        never waits for it.
        """
        response = await self._explain_upload(image)
        ctx.response.status_code = response.status_code
        return response

    async def _explain_upload(self, image: Path) -> Response:
        read = await self._read_digit(image, 0)
        if isinstance(read, Response):
            return read
        digit = read[0]
        try:
            answer = (await self.batcher.submit(digit[None]))[0]
        except ModelUnavailable as err:
            return _error(503, str(err))
        current = self.watcher.current
        if current is None or current.ref.version != answer["model_version"]:
            return _error(503, "the champion changed while answering; send the image again", **{"Retry-After": "1"})
        try:
            explainer = await self._explainer_of(current.ref)
        except Exception:  # the answer path is unharmed; the reason goes to the server's log, not to the client
            log.exception("the Keras model of version %s could not be loaded for /explain", current.ref.version)
            return _error(503, f"version {current.ref.version} cannot be explained right now: its Keras model did not load")
        explanation = await anyio.to_thread.run_sync(explainer.explain, digit[None], [answer["digit"]])
        saliency = explanation[0].saliency
        explained = Explained(
            **{name: answer[name] for name in ("digit", "confidence", "unsure", "probabilities", "model_name", "model_version")},
            run_id=answer["run_id"],
            method=METHOD,
            saliency=np.round(saliency, 3).tolist(),
            seen_png=base64.b64encode(digit_png(digit)).decode(),
            overlay_png=base64.b64encode(overlay_png(digit, saliency)).decode(),
        )
        return _json(explained.model_dump_json().encode())

    async def _explainer_of(self, ref: ModelRef) -> Explainer:
        """The explainer of a version, its Keras model loaded once (in a thread; one load at a time)."""
        if self._explaining is None:
            self._explaining = anyio.Lock()
        async with self._explaining:
            if self._explainer is None or self._explainer[0] != ref.version:
                from pipeline.registry import load_keras_checked

                # the files the gate passed, as the served model's are: explaining another model would mislead
                model = await anyio.to_thread.run_sync(load_keras_checked, ref.uri, ref.served_sha256 or {})
                self._explainer = (ref.version, Explainer(model))
            return self._explainer[1]

    # ------------------------------------------------------------ corrections (FastAPI: 201, 404, 409, 422)

    @ui.post("/feedback", status_code=201)
    async def feedback(self, request: Request):
        """Record the true digit of an answer: JSON ``{"request_id": "...", "label": 7}``.

        201 with what was answered and whether it was right; 404 for an unknown request id; 409 when
        that answer was corrected before (the first label stands); 422 for a label that is not 0-9.
        """
        writer = self.answer_log.writer
        if writer is None:
            return _error(503, f"corrections cannot be recorded: {self.answer_log.problem}")
        body = await request.body()
        if len(body) > FEEDBACK_BYTES:
            return _error(413, f"the request body is {len(body):,} bytes; /feedback takes at most {FEEDBACK_BYTES:,}")
        try:
            sent = json.loads(body)
        except ValueError as err:
            return _error(400, f'the body is not valid JSON ({err}): send {{"request_id": "...", "label": 7}}')
        if not isinstance(sent, dict) or not {"request_id", "label"} <= sent.keys():
            return _error(422, 'send a JSON object with "request_id" (from an answer) and "label" (the true digit 0-9)')
        await anyio.to_thread.run_sync(writer.flush)  # the answer being corrected may still be queued
        client = prediction_log.client_digest(request.client.host if request.client else None)
        policy = self.settings.feedback_policy
        try:
            recorded = await anyio.to_thread.run_sync(
                prediction_log.record_feedback, writer.engine, sent["request_id"], sent["label"], client, policy
            )
        except prediction_log.FeedbackRefused as err:
            return _error(err.status, str(err))
        except SQLAlchemyError as err:  # the database is down or locked: nothing was stored, the sender may retry
            log.error("a correction could not be recorded: %s", err)
            return _error(503, f"the prediction log cannot record corrections right now ({type(err).__name__}); retry later")
        self.counters.feedback.labels(model_version=recorded["model_version"]).inc()
        return JSONResponse(recorded, status_code=201)

    # ------------------------------------------------------------ plain GET routes (FastAPI)

    @ui.get("/model")
    def model_info(self):
        """The champion being served (503 with the reason while there is none; no server paths)."""
        watcher = self.watcher
        status = {
            "champion_poll_seconds": watcher.poll_seconds,
            "last_check": watcher.last_check,
            "problem": watcher.problem,
        }
        try:
            current = watcher.require()
        except ModelUnavailable as err:
            return JSONResponse(redacted({"error": str(err), **status}), status_code=503)
        ref = current.ref
        return redacted(
            {
                "model_name": ref.model_name,
                "model_version": ref.version,
                "run_id": ref.run_id,
                "uri": ref.uri,
                "runtime": current.runtime,
                "metrics": ref.metrics,
                "data_version": ref.data_version,
                "git_commit": ref.git_commit,
                "promoted_at": ref.promoted_at,
                "promoted_by": ref.promoted_by,
                "promotion_reason": ref.promotion_reason,
                "loaded_at": current.loaded_at,
                "load_seconds": round(current.load_seconds, 3),
                **status,
                "batching": self.batcher.stats(),
                "prediction_log": self.answer_log.info(),
                "challenger": self._challenger_info(),
            }
        ) | {"model_card": MODEL_CARD_ROUTE}  # the service's own route: not a server path to hide

    @ui.get(MODEL_CARD_ROUTE, include_in_schema=False)
    async def model_card(self):
        """The served version's model card (HTML, from its run in the registry)."""
        try:
            ref = self.watcher.require().ref
        except ModelUnavailable as err:
            return _error(503, str(err))
        from pipeline import card_store

        try:
            _, page = await anyio.to_thread.run_sync(card_store.card_html, self.settings, ref.version)
        except Exception as err:  # the registry or the run's artifacts could not be read: say so, without a trace
            log.warning("model card of v%s: %s: %s", ref.version, type(err).__name__, err)
            return _error(503, f"the model card of v{ref.version} cannot be read from the registry right now; retry later")
        # the card is a page of its own: inline style and embedded images, no script, no framing
        return Response(page, media_type="text/html", headers={"Content-Security-Policy": CARD_POLICY})

    def _challenger_info(self) -> dict | None:
        model = self.challenger.current
        if model is None:
            return {"problem": self.challenger.problem} if self.challenger.problem else None
        return {
            "model_version": model.ref.version,
            "run_id": model.ref.run_id,
            "runtime": model.runtime,
            "waiting": self.shadow_waiting,
            "skipped": self.shadow_skipped,
            "batching": self.shadow.stats(),
        }

    @ui.get("/draw", include_in_schema=False)
    def drawing_page(self):
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @ui.get("/draw/", include_in_schema=False)
    def drawing_page_slash(self):
        return RedirectResponse("/draw")


DigitClassifier.add_asgi_middleware(ServingGuard)
