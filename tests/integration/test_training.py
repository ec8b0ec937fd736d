"""``pipeline.train`` with real Keras on a slice of real MNIST: input batches, seeding, weight averaging."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration

# a small net and one short epoch: enough to tell weights and losses apart
SMALL = {"model.conv_filters": [8, 16], "model.dense_units": 32, "train.epochs": 1, "train.validation_split": 0.2}


def _params(**overrides):
    from pipeline.params import load_params

    return load_params(REPO / "params.yaml", {**SMALL, **overrides})


def _flat_weights(model) -> np.ndarray:
    return np.concatenate([w.ravel() for w in model.get_weights()])


def test_batches_cover_every_image_once_an_epoch_in_a_new_seeded_order():
    from pipeline.train import batches

    x = np.arange(10 * 28 * 28, dtype=np.uint8).reshape(10, 28, 28)
    y = np.arange(10, dtype=np.int64)

    def epochs(dataset, n: int) -> list[list[int]]:
        return [[int(label) for _, labels in dataset for label in labels.numpy()] for _ in range(n)]

    first, second = epochs(batches(x, y, 4, shuffle_seed=7), 2)
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second  # reshuffled every epoch
    assert epochs(batches(x, y, 4, shuffle_seed=7), 2) == [first, second]  # the same seed, the same orders
    assert epochs(batches(x, y, 4), 1) == [list(range(10))]  # no seed: in order (validation)
    images, labels = next(iter(batches(x, y, 4, shuffle_seed=7)))
    assert images.shape == (4, 28, 28, 1) and labels.dtype.name == "int32"
    # each image travels with its own label
    assert [round(float(i[0, 0, 0]) * 255) for i in images.numpy()] == [int(x[k, 0, 0]) for k in labels.numpy()]


def test_the_same_seed_trains_the_same_weights(mnist_slice):
    from pipeline.train import train

    one, two = (train(mnist_slice, _params()).model for _ in range(2))
    other_seed = train(mnist_slice, _params(**{"train.seed": 7})).model
    assert np.array_equal(_flat_weights(one), _flat_weights(two))
    assert not np.array_equal(_flat_weights(one), _flat_weights(other_seed))


def test_the_weights_do_not_depend_on_other_users_of_pythons_random(monkeypatch):
    """Prefect's and MLflow's background threads draw from Python's shared ``random``; a model must not."""
    import random

    from pipeline import model as model_module
    from pipeline.train import seed_everything

    params = _params(**{"model.augment_shift": 0.1})
    seed_everything(params.train.seed)
    alone = model_module.build_model(params.model, params.train, steps_per_epoch=10)
    seed_everything(params.train.seed)
    random.random()  # what another thread may do between the seeding and the build
    disturbed = model_module.build_model(params.model, params.train, steps_per_epoch=10)
    assert np.array_equal(_flat_weights(alone), _flat_weights(disturbed))
    # and the layers that draw at training time (shift, dropout) carry seeds of their own
    seeded = [layer.name for layer in disturbed.layers if hasattr(layer, "seed") and layer.seed is None]
    assert seeded == []


def test_weight_averaging_validates_and_returns_the_averaged_weights(mnist_slice):
    from pipeline.train import batches, split_for_validation, train

    params = _params(**{"train.ema_momentum": 0.9})
    averaged = train(mnist_slice, params)
    plain = train(mnist_slice, _params(**{"train.ema_momentum": 0.0}))
    assert not np.array_equal(_flat_weights(averaged.model), _flat_weights(plain.model))

    # the last validation loss is the returned model's own, not that of the last step's weights
    _, _, x_val, y_val = split_for_validation(mnist_slice.x_train, mnist_slice.y_train, 0.2, params.train.seed)
    loss, _ = averaged.model.evaluate(batches(x_val, y_val, 128), verbose=0)
    assert loss == pytest.approx(averaged.history["val_loss"][-1], rel=1e-5)


def test_every_augmentation_changes_training_images_only_and_is_seeded(mnist_slice):
    from pipeline.model import build_model
    from pipeline.preprocess import to_model_input

    every = {
        "model.augment_rotation": 15.0,
        "model.augment_zoom": 0.1,
        "model.augment_shear": 0.2,
        "model.augment_elastic": 0.5,
        "model.augment_blur": 0.5,
        "model.augment_stroke": 0.5,
        "model.augment_noise": 0.05,
    }
    params = _params(**every)
    model = build_model(params.model, params.train, steps_per_epoch=10)
    images = to_model_input(mnist_slice.x_test[:64])
    augmentations = model.layers[1 : 1 + len(every)]
    assert len({type(layer).__name__ for layer in augmentations}) == len(every)

    def through(training: bool) -> np.ndarray:
        x = images
        for layer in augmentations:
            x = layer(x, training=training)
        return np.asarray(x)

    assert np.array_equal(through(training=False), images)  # inference sees the images as they are
    augmented = through(training=True)
    assert augmented.shape == images.shape and not np.allclose(augmented, images)
    # the same seed builds the same augmentations: the same first batch of changed images
    again = build_model(params.model, params.train, steps_per_epoch=10).layers[1 : 1 + len(every)]
    x = images
    for layer in again:
        x = layer(x, training=True)
    assert np.allclose(np.asarray(x), augmented)


def test_a_model_with_the_stroke_augmentation_saves_and_loads(mnist_slice, tmp_path):
    import keras

    import pipeline.augment  # noqa: F401
    from pipeline.train import train

    trained = train(mnist_slice.head(500, 100), _params(**{"model.augment_stroke": 0.5})).model
    trained.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert np.array_equal(_flat_weights(loaded), _flat_weights(trained))
