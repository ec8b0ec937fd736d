"""Why the model answered what it did: integrated gradients over the normalised 28x28 digit.

Integrated gradients (Sundararajan et al., 2017) follow the straight path from a blank image to the
digit and add up, pixel by pixel, how the answered digit's score (the logit, before the softmax)
rose along it. The attributions sum to the score's rise from the blank image, and a pixel without
ink gets none: on a 28x28 digit that reads better than Grad-CAM, whose 7x7 map of the last
convolution block smears over the empty border. It runs on the Keras model of a version (the served
TensorFlow Lite exports keep no gradients).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pipeline.preprocess import SIDE, to_model_input

if TYPE_CHECKING:
    import keras

METHOD = "integrated gradients from a blank image, on the answered digit's logit"
STEPS = 32  # points on the path from the blank image; the sum's error shrinks with their number


@dataclass(frozen=True)
class Explanation:
    """One image's answer and why: ``attributions`` (28, 28) add up to the score's rise over a blank image;
    ``saliency`` is their positive part scaled to [0, 1], 1 where the ink counted most for the answer."""

    digit: int
    probabilities: np.ndarray
    attributions: np.ndarray
    score_rise: float

    @property
    def saliency(self) -> np.ndarray:
        positive = np.maximum(self.attributions, 0.0)
        peak = positive.max()
        return (positive / peak if peak > 0 else positive).astype(np.float32)


class Explainer:
    """Integrated gradients for one Keras model of this project's architecture (a softmax head named ``probabilities``)."""

    def __init__(self, model: keras.Model, steps: int = STEPS) -> None:
        import keras

        self.steps = steps
        self.head = model.get_layer("probabilities")
        self.features = keras.Model(model.inputs, self.head.input)  # the logits are computed from these below

    def _logits(self, pixels):
        import tensorflow as tf

        return tf.matmul(self.features([pixels], training=False), self.head.kernel) + self.head.bias  # its one input, as a list

    def explain(self, images: np.ndarray, digits: list[int | None] | None = None) -> list[Explanation]:
        """For uint8 images (n, 28, 28) on the 0-255 scale: the answer and why, for the answered digit
        (or for ``digits[i]`` when given, to ask why not another)."""
        import tensorflow as tf

        pixels = to_model_input(images)
        logits = self._logits(pixels).numpy()
        answered = logits.argmax(axis=1)
        wanted = answered if digits is None else np.array([a if d is None else d for a, d in zip(answered, digits, strict=True)])
        blank = self._logits(np.zeros_like(pixels[:1])).numpy()[0]
        alphas = tf.reshape((tf.range(self.steps, dtype=tf.float32) + 0.5) / self.steps, (-1, 1, 1, 1))  # midpoints
        explained = []
        for image, digit, row in zip(pixels, wanted, logits, strict=True):
            path = alphas * image[None]
            with tf.GradientTape() as tape:
                tape.watch(path)
                score = self._logits(path)[:, digit]
            average = tf.reduce_mean(tape.gradient(score, path), axis=0).numpy()
            attributions = (image * average)[..., 0]
            explained.append(
                Explanation(
                    digit=int(digit),
                    probabilities=tf.nn.softmax(row).numpy(),
                    attributions=attributions.astype(np.float32),
                    score_rise=float(row[digit] - blank[digit]),
                )
            )
        return explained


def digit_png(image: np.ndarray, scale: int = 8) -> bytes:
    """The normalised digit as the model saw it (ink white on black), enlarged for people to look at."""
    from PIL import Image

    pixels = np.clip(np.rint(np.asarray(image, dtype=np.float32)), 0, 255).astype(np.uint8)
    return _png(Image.fromarray(pixels, mode="L").resize((SIDE * scale, SIDE * scale), Image.Resampling.NEAREST))


def overlay_png(image: np.ndarray, saliency: np.ndarray, scale: int = 8) -> bytes:
    """The saliency as a heat map (transparent where zero, red to yellow where it looked most) over the digit."""
    from matplotlib import colormaps
    from PIL import Image

    size = (SIDE * scale, SIDE * scale)
    digit = Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), mode="L").convert("RGBA").resize(size)
    heat = (colormaps["inferno"](np.clip(saliency, 0.0, 1.0)) * 255).astype(np.uint8)
    heat[..., 3] = (np.clip(saliency, 0.0, 1.0) * 200).astype(np.uint8)  # opacity follows the saliency
    layer = Image.fromarray(heat, mode="RGBA").resize(size, Image.Resampling.BILINEAR)
    return _png(Image.alpha_composite(digit, layer))


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
