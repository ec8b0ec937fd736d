"""Train the CNN on a dataset, reporting progress and per-epoch metrics through a callback."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pipeline.data import Dataset
from pipeline.model import build_model
from pipeline.params import Params
from pipeline.preprocess import to_model_input

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

log = logging.getLogger(__name__)

EpochHook = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    model: keras.Model
    history: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    images_per_second: float = 0.0


def seed_everything(seed: int) -> None:
    """Same seed, same weights: Python, NumPy and TensorFlow, with deterministic ops."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def split_for_validation(x: np.ndarray, y: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, ...]:
    """Shuffle with the seed, then hold out ``share`` for per-epoch validation.

    Shuffling first matters: added images sit at the end of the training split.
    """
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_val = int(round(len(x) * share))
    return x[n_val:], y[n_val:], x[:n_val], y[:n_val]


def with_feedback(x: np.ndarray, y: np.ndarray, dataset: Dataset, weight: int) -> tuple[np.ndarray, np.ndarray]:
    """The images to fit plus feedback-train repeated ``weight`` times, so a few hundred real drawings count.

    Added after the validation split, so that no copy of a feedback image is validated on.
    """
    if not weight or not len(dataset.x_feedback_train):
        return x, y
    log.info("training on %d feedback images, each counted %d times", len(dataset.x_feedback_train), weight)
    return (
        np.concatenate([x, np.repeat(dataset.x_feedback_train, weight, axis=0)]),
        np.concatenate([y, np.repeat(dataset.y_feedback_train, weight)]),
    )


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, shuffle_seed: int | None = None) -> tf.data.Dataset:
    """(model input, label) batches of raw images, reshuffled every epoch when given a seed.

    Built here rather than left to ``model.fit(x, y)``: Keras' own pipeline for arrays runs tf.data's
    autotuner, and deleting an epoch's iterator then waits, idle, for the autotuner's next wake-up.
    The shuffle buffer holds indices only; each batch is one gather.
    """
    import tensorflow as tf

    images, labels = tf.constant(to_model_input(x)), tf.constant(y.astype(np.int32))
    order = tf.data.Dataset.range(len(x))
    if shuffle_seed is not None:
        order = order.shuffle(len(x), seed=shuffle_seed, reshuffle_each_iteration=True)
    dataset = order.batch(batch_size).map(lambda i: (tf.gather(images, i), tf.gather(labels, i)))
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options).prefetch(1)


def train(
    dataset: Dataset,
    params: Params,
    on_epoch: EpochHook | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> TrainResult:
    """Seeded training on ``params``; ``on_epoch`` gets each epoch's metrics, ``callbacks`` the Keras events."""
    import keras

    seed_everything(params.train.seed)
    x_fit, y_fit, x_val, y_val = split_for_validation(
        dataset.x_train, dataset.y_train, params.train.validation_split, params.train.seed
    )
    x_fit, y_fit = with_feedback(x_fit, y_fit, dataset, params.feedback.train_weight)
    steps = int(np.ceil(len(x_fit) / params.train.batch_size))
    model = build_model(params.model, params.train, steps)
    log.info(
        "training %s (%s parameters) on %d images, validating on %d, %d epochs",
        model.name,
        f"{model.count_params():,}",
        len(x_fit),
        len(x_val),
        params.train.epochs,
    )

    class Progress(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            seconds = time.perf_counter() - self.started
            values = {k: float(v) for k, v in (logs or {}).items() if k != "learning_rate"}
            values["epoch_seconds"] = seconds
            values["images_per_second"] = len(x_fit) / seconds
            shown = "  ".join(f"{k} {v:.4f}" for k, v in values.items() if "loss" in k or "accuracy" in k)
            log.info(
                "epoch %d/%d  %s  %.1f s  %s img/s",
                epoch + 1,
                params.train.epochs,
                shown,
                seconds,
                f"{values['images_per_second']:,.0f}",
            )
            if on_epoch:
                on_epoch(epoch, values)

    batch_size = params.train.batch_size
    started = time.perf_counter()
    fitted = model.fit(
        batches(x_fit, y_fit, batch_size, shuffle_seed=params.train.seed),
        epochs=params.train.epochs,
        validation_data=batches(x_val, y_val, batch_size) if len(x_val) else None,
        shuffle=False,  # the dataset reshuffles itself every epoch
        verbose=0,
        # with weight averaging, validate the averaged weights: they are what fit returns
        callbacks=[*([keras.callbacks.SwapEMAWeights()] if params.train.ema_momentum else []), Progress(), *callbacks],
    )
    seconds = time.perf_counter() - started
    history = {k: [float(v) for v in values] for k, values in fitted.history.items() if k != "learning_rate"}
    return TrainResult(model, history, seconds, len(x_fit) * params.train.epochs / seconds)


def compiled_predictor(model: keras.Model) -> Callable[[np.ndarray], np.ndarray]:
    """A traced inference function: ``model.predict`` pays a large fixed cost on every call."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    @tf.autograph.experimental.do_not_convert  # plain tensor code: nothing for AutoGraph to rewrite
    def infer(x):
        return model(x, training=False)

    return lambda x: infer(tf.convert_to_tensor(x, dtype=tf.float32)).numpy()
