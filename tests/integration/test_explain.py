"""Integrated gradients on a trained CNN: the attributions add up, and lie on the ink."""

from __future__ import annotations

import io

import numpy as np
import pytest

from tests.integration.serving_fixtures import trained_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def explainer(mnist_slice):
    from pipeline.explain import Explainer

    model, accuracy = trained_model(mnist_slice)
    assert accuracy > 0.8  # a model that reads digits, or its saliency means little
    return Explainer(model)


def test_the_saliency_lies_on_the_ink_of_the_answered_digit(explainer, mnist_slice):
    images = mnist_slice.x_test[:20]
    explained = explainer.explain(images)
    assert [e.digit for e in explained] == [int(e.probabilities.argmax()) for e in explained]
    for image, explanation in zip(images, explained, strict=True):
        saliency, attributions = explanation.saliency, explanation.attributions
        assert saliency.shape == attributions.shape == (28, 28)
        assert saliency.min() >= 0 and saliency.max() == pytest.approx(1.0)
        # completeness: the attributions add up to the answered score's rise over a blank image
        assert attributions.sum() == pytest.approx(explanation.score_rise, rel=0.1) and explanation.score_rise > 0
        # nothing is attributed where there is no ink, and the ink adds up to a positive push
        assert np.all(attributions[image == 0] == 0) and attributions[image > 0].sum() > 0
    assert np.mean([e.probabilities.max() for e in explained]) > 0.5


def test_asking_why_not_another_digit_gives_another_map(explainer, mnist_slice):
    image = mnist_slice.x_test[:1]
    answered = explainer.explain(image)[0]
    other = (answered.digit + 1) % 10
    asked = explainer.explain(image, [other])[0]
    assert asked.digit == other and not np.allclose(asked.saliency, answered.saliency)


def test_the_pictures_are_pngs_of_the_enlarged_digit(explainer, mnist_slice):
    from PIL import Image

    from pipeline.explain import digit_png, overlay_png

    image = mnist_slice.x_test[0]
    explanation = explainer.explain(image[None])[0]
    seen = Image.open(io.BytesIO(digit_png(image)))
    assert seen.format == "PNG" and seen.size == (224, 224)
    np.testing.assert_array_equal(np.asarray(seen)[::8, ::8], image)  # nearest: each pixel an 8x8 square
    overlay = Image.open(io.BytesIO(overlay_png(image, explanation.saliency)))
    assert overlay.format == "PNG" and overlay.size == (224, 224) and overlay.mode == "RGBA"
    # where the model looked most, the overlay is coloured; where it did not look, it is the digit's grey
    hot = np.unravel_index(explanation.saliency.argmax(), (28, 28))
    pixels = np.asarray(overlay.convert("RGB")).astype(int)
    red, green, blue = pixels[hot[0] * 8 + 4, hot[1] * 8 + 4]
    assert not (red == green == blue)
