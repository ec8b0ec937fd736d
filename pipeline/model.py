"""The CNN, built from ``params.yaml``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pipeline.params import ModelParams, TrainParams

if TYPE_CHECKING:
    import keras


def build_model(params: ModelParams, train: TrainParams, steps_per_epoch: int) -> keras.Model:
    """[augmentations] -> conv blocks (conv -> [batch norm] -> relu -> max-pool) -> [dense] -> dropout -> softmax(10).

    Augmentations are active in training only: inference, evaluation and serving see the images as they are.
    The learning rate follows a cosine decay over the whole run, which lets a short run settle.
    With ``train.ema_momentum`` the optimizer also keeps a moving average of the weights, which
    ``fit`` leaves in the model at its end.
    """
    import keras
    import numpy as np
    from keras import layers

    # Keras draws unseeded layers' seeds from Python's shared `random`, which other threads also use
    draws = np.random.default_rng(train.seed)

    def seed() -> int:
        return int(draws.integers(1, 2**31 - 1))

    def kernel() -> keras.initializers.Initializer:
        return keras.initializers.GlorotUniform(seed())

    inputs = keras.Input(shape=(28, 28, 1), name="pixels")
    x = inputs
    for augmentation in _augmentations(params, seed):
        x = augmentation(x)
    for filters in params.conv_filters:
        x = layers.Conv2D(
            filters, params.kernel_size, use_bias=not params.batch_norm, padding="same", kernel_initializer=kernel()
        )(x)
        if params.batch_norm:
            # momentum 0.9: the moving statistics settle within a few hundred steps, even on small data
            x = layers.BatchNormalization(momentum=0.9)(x)
        x = layers.ReLU()(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    if params.dense_units:
        x = layers.Dense(params.dense_units, activation="relu", kernel_initializer=kernel())(x)
    x = layers.Dropout(params.dropout, seed=seed())(x)
    outputs = layers.Dense(10, activation="softmax", name="probabilities", kernel_initializer=kernel())(x)
    model = keras.Model(inputs, outputs, name="digits_cnn")
    schedule = keras.optimizers.schedules.CosineDecay(train.learning_rate, decay_steps=max(1, steps_per_epoch * train.epochs))
    # the average is steadier than the last step's weights while the learning rate is still high
    averaging = {"use_ema": True, "ema_momentum": train.ema_momentum} if train.ema_momentum else {}
    model.compile(
        optimizer=keras.optimizers.Adam(schedule, **averaging),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def _augmentations(params: ModelParams, seed: Callable[[], int]) -> list[keras.layers.Layer]:
    """The training-only transformations ``params`` turns on, in the order a pen, a hand and a camera apply them.

    Shifted copies are new training images for free: the strongest regulariser measured for this net;
    the others make the world's digits (tilted, thick, blurred, noisy) look less new.
    """
    from keras import layers

    from pipeline.augment import RandomStrokeWidth

    steps: list[keras.layers.Layer] = []
    if params.augment_stroke:
        steps.append(RandomStrokeWidth(params.augment_stroke, seed=seed()))
    if params.augment_elastic:
        steps.append(layers.RandomElasticTransform(params.augment_elastic, value_range=(0, 1), fill_mode="constant", seed=seed()))
    if params.augment_rotation:
        steps.append(layers.RandomRotation(params.augment_rotation / 360, fill_mode="constant", seed=seed()))
    if params.augment_shear:
        steps.append(layers.RandomShear(params.augment_shear, params.augment_shear, fill_mode="constant", seed=seed()))
    if params.augment_zoom:
        steps.append(layers.RandomZoom((-params.augment_zoom, params.augment_zoom), fill_mode="constant", seed=seed()))
    if params.augment_shift:
        steps.append(layers.RandomTranslation(params.augment_shift, params.augment_shift, fill_mode="constant", seed=seed()))
    if params.augment_blur:
        steps.append(layers.RandomGaussianBlur(params.augment_blur, kernel_size=3, sigma=1.0, value_range=(0, 1), seed=seed()))
    if params.augment_noise:
        steps.append(layers.GaussianNoise(params.augment_noise, seed=seed()))
    return steps


def limit_threads(threads: int | None) -> None:
    """Size TensorFlow's thread pools before its runtime starts (None or 0: TensorFlow's default).

    Parallel trainings and the service's replicas share the cores this way instead of fighting over them.
    """
    import logging

    import tensorflow as tf

    if not threads:
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # TensorFlow ran before in this process: its pools keep the sizes they started with
        logging.getLogger(__name__).info("TensorFlow is initialised already in this process; its thread pools keep their sizes")
