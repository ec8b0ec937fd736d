"""PROTOTYPE for measurement."""

import logging
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from pydantic import BaseModel, BeforeValidator
from pydantic_core import PydanticCustomError
from starlette.responses import JSONResponse

from pipeline.preprocess import MAX_BYTES, SIDE, ImageError, image_bytes_to_mnist
from pipeline.settings import get_settings
from serving.champion import ChampionWatcher, ModelUnavailable

log = logging.getLogger(__name__)


class InputRefused(ValueError):
    pass


def parse_pixels(raw: Any, max_images: int) -> np.ndarray:
    if isinstance(raw, np.ndarray):
        arr = raw
    else:
        try:
            arr = np.asarray(raw)
        except ValueError as err:
            raise InputRefused(f"pixels must be a rectangular array of numbers: {err}") from None
    if arr.dtype.kind not in "iuf":
        raise InputRefused(f"pixels must be numbers; got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != (SIDE, SIDE):
        raise InputRefused(f"expected (28, 28) or (n, 28, 28), got {arr.shape}")
    if len(arr) > max_images:
        raise InputRefused(f"batch of {len(arr)} > {max_images}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise InputRefused("NaN")
    if arr.min() < 0 or arr.max() > 255:
        raise InputRefused("range")
    return arr


def _validated(raw: Any) -> np.ndarray:
    try:
        return parse_pixels(raw, get_settings().max_batch_images)
    except InputRefused as err:
        raise PydanticCustomError("pixels", str(err)) from None


Pixels = Annotated[np.ndarray, BeforeValidator(_validated)]


class Prediction(BaseModel):
    digit: int
    confidence: float
    probabilities: list[float]
    model_name: str
    model_version: str
    run_id: str | None


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@bentoml.service(name="digits", workers=1, threads=4, traffic={"timeout": 30})
class DigitClassifier:
    def __init__(self) -> None:
        self.settings = get_settings()
        self.watcher = ChampionWatcher(self.settings).start()

    def __is_ready__(self) -> bool:
        return self.watcher.current is not None

    @bentoml.api(route="/predict")
    def predict(self, image: Path) -> Prediction:
        try:
            model = self.watcher.require()
            data = image.read_bytes()
            digit = image_bytes_to_mnist(data)
        except ModelUnavailable as err:
            return _error(503, str(err))
        except ImageError as err:
            return _error(400, str(err))
        return model.answers(digit[None])[0]

    @bentoml.api(route="/predict_pixels")
    def predict_pixels(self, pixels: Pixels) -> list[Prediction]:
        try:
            model = self.watcher.require()
        except ModelUnavailable as err:
            return _error(503, str(err))
        return model.answers(pixels)

    @bentoml.api(route="/predict_pixels_batched", batchable=True, max_batch_size=1000, max_latency_ms=30000)
    def predict_pixels_batched(self, pixels: Pixels) -> list[Prediction]:
        model = self.watcher.require()
        return model.answers(pixels)
