"""The sample-mistakes figure: which images it shows, in which order, and where."""

from __future__ import annotations

import numpy as np

from pipeline.plots import misclassified_grid, reliability_diagram


def _probabilities(predicted: list[int], confidence: list[float]) -> np.ndarray:
    rows = np.full((len(predicted), 10), 0.0)
    for row, (digit, p) in enumerate(zip(predicted, confidence, strict=True)):
        rows[row] = (1 - p) / 9
        rows[row, digit] = p
    return rows


def test_most_confident_mistakes_come_first_each_image_in_its_tile():
    images = np.stack([np.full((28, 28), 10 * (i + 1), np.uint8) for i in range(5)])  # each image its own shade
    y_true = np.array([0, 1, 2, 3, 4])
    # images 1, 3 and 4 are wrong, at 60 %, 95 % and 80 %; 0 and 2 are right
    probabilities = _probabilities([0, 7, 2, 8, 9], [0.9, 0.6, 0.99, 0.95, 0.8])

    fig = misclassified_grid(images, y_true, probabilities)

    (ax,) = fig.axes
    assert fig.get_suptitle() == "3 misclassified test images (most confident first)"
    captions = [text.get_text() for text in ax.texts]
    assert captions == ["true 3 / pred 8\n95%", "true 4 / pred 9\n80%", "true 1 / pred 7\n60%"]
    tiles = ax.images[0].get_array()
    # each caption sits just above the image it names: read the tile's shade under it
    for text, image in zip(ax.texts, (3, 4, 1), strict=True):
        x, y = text.get_position()
        assert tiles[int(y) + 14, int(x)] == images[image, 0, 0]


def test_the_limit_keeps_the_most_confident_and_no_mistakes_draws_an_empty_grid():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (100, 28, 28), dtype=np.uint8)
    y_true = np.zeros(100, int)
    confidence = np.linspace(0.5, 0.99, 100)
    fig = misclassified_grid(images, y_true, _probabilities([1] * 100, list(confidence)), limit=16)
    assert len(fig.axes[0].texts) == 16
    assert fig.axes[0].texts[0].get_text() == "true 0 / pred 1\n99%"

    empty = misclassified_grid(images, y_true, _probabilities([0] * 100, [0.9] * 100))
    assert empty.get_suptitle().startswith("0 misclassified") and not empty.axes[0].texts


def test_reliability_diagram_shows_each_panel_with_its_error():
    from pipeline.calibration import reliability, softmax

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(200, 10))
    labels = rng.integers(0, 10, 200)
    panels = {"before": reliability(softmax(logits * 3), labels), "after": reliability(softmax(logits), labels)}

    fig = reliability_diagram(panels, "validation")

    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [f"before: ECE {panels['before'].ece:.4f}", f"after: ECE {panels['after'].ece:.4f}"]
    assert fig.get_suptitle() == "validation (200 images)"


def test_explained_mistakes_show_each_digit_above_its_saliency():
    from pipeline.plots import explained_mistakes

    images = np.stack([np.full((28, 28), 10 * (i + 1), np.uint8) for i in range(3)])
    saliencies = np.zeros((3, 28, 28), np.float32)
    saliencies[:, 10, 10] = 1.0
    fig = explained_mistakes(images, np.array([1, 3, 4]), _probabilities([7, 8, 9], [0.6, 0.95, 0.8]), saliencies)
    axes = fig.axes
    assert len(axes) == 6
    assert [ax.get_title() for ax in axes[:3]] == ["true 1 / pred 7\n60%", "true 3 / pred 8\n95%", "true 4 / pred 9\n80%"]
    assert [len(ax.images) for ax in axes[3:]] == [2, 2, 2]  # the digit, and the saliency over it
    np.testing.assert_array_equal(axes[4].images[1].get_array(), saliencies[1])
