"""Training-time augmentations that Keras does not ship: strokes drawn thinner or thicker.

Imported by the model's builder and before a saved model is loaded, so that Keras knows the layer.
"""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="digits")
class RandomStrokeWidth(keras.layers.Layer):
    """In training, draws a share ``rate`` of the images one pixel thinner or thicker (grey-level erosion or dilation).

    Pens differ more than MNIST's do; inference sees the images as they are.
    """

    def __init__(self, rate: float, seed: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rate = rate
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training: bool = False):
        if not training or not self.rate:
            return images
        thicker = keras.ops.max_pool(images, 3, strides=1, padding="same")
        thinner = -keras.ops.max_pool(-images, 3, strides=1, padding="same")
        draw = keras.random.uniform((keras.ops.shape(images)[0], 1, 1, 1), seed=self.seed_generator)
        return keras.ops.where(draw < self.rate / 2, thinner, keras.ops.where(draw < self.rate, thicker, images))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}
